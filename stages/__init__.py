"""DVC stage scripts. Each reads its own params.yaml section, calls the library and writes outs."""
