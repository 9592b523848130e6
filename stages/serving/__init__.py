"""serving: the registered tasks of one backbone as an MLflow pyfunc model."""
