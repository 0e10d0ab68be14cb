"""Operator commands (the `image-features` console script): checks and views over the deployed stack, with the
settings the functions use; no Spark, no TensorFlow."""
