"""config: the params.yaml sections as pydantic models, their cross-section checks and the stage CLI."""
