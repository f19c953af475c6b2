"""Data: the 19-class label space, readers for the five data sets in their real layouts, the
training and test transforms of Rein's protocol, verification, and the synthetic miniature."""

from fishertune.data.datasets import DATASETS, build_dataset
from fishertune.data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES, PALETTE
from fishertune.data.synth import synthesize
from fishertune.data.transforms import TestResize, TrainTransform, to_tensor
from fishertune.data.verify import verify_dataset

__all__ = ["CLASSES", "NUM_CLASSES", "IGNORE_INDEX", "PALETTE", "build_dataset", "DATASETS", "synthesize",
           "verify_dataset", "TrainTransform", "TestResize", "to_tensor"]
