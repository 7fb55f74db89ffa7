"""functional_parallel: models, optimizers, data and the train step as pure functions over pytrees."""
from . import tree  # first: fixes the pytree dict order for everything below
from . import data, models, optim, train
from .models import Model, build
from .train import make_train_step

__all__ = ["tree", "data", "models", "optim", "train", "Model", "build", "make_train_step"]
