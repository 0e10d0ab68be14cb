"""Featurize a tree of images with MobileNetV2 and reduce the features with PCA, on Spark."""
