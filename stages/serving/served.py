"""The file MLflow logs as the served model's code (models from code: no pickle);
``stages.serving.build`` passes it to ``mlflow.pyfunc.log_model``."""

from mlflow.models import set_model

from stages.serving.pyfunc import RecastServed

set_model(RecastServed())
