"""The sizes of the shared end-to-end run (``conftest.pipeline_run``), imported by its tests."""

TASKS = ["mnist_lo5", "uci_digits"]  # 5 and 10 classes
SEEDS = [42, 7]
EPOCHS = 2
EXPERIMENT = "e2e"
