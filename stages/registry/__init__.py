"""The payload registry's command line: python -m stages.registry list|fetch|show|reproduce."""
