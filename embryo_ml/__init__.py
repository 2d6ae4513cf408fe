"""embryo-ml: train, export and run IVF embryo image classifiers.

Importing the package is cheap on purpose: the scoring path must not pull in torch or mlflow.
"""

__version__ = "0.1.0"
