"""The model under test: find and load the checkpoint, and prepare its forward."""
