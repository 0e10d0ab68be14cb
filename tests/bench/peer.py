"""THE PEER -- not this project. The usual way to featurize images with Spark, written as tutorials and the
OpenClassrooms "fruits" project write it, so that `make bench` compares this project with it on the same data:

  spark.read.format("binaryFile")          every image's bytes as a row (recursive, by extension)
  -> iterator pandas_udf                   the network built once per Arrow batch iterator, weights broadcast,
                                           images decoded with PIL, model.predict(batch_size=32)
  -> features written as Parquet
  -> pyspark.ml.feature.PCA(k)             fitted on the features read back, coordinates written as Parquet

    python tests/bench/peer.py --input DIR --output DIR --weights FILE.weights.h5 --k K [--predict-batch-udf]

--predict-batch-udf replaces the pandas_udf with Spark's own pyspark.ml.functions.predict_batch_udf, fed by
a UDF that decodes each image to a 224x224x3 float array (its documented input: numeric arrays).
Spark is configured as such code usually is: local[*], Arrow batches of 10,000 rows (the default) reduced
to 256 so that a batch of decoded images fits in memory, driver memory 4 GB; the images are repartitioned to
one partition per core. Prints one JSON line."""

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterator

import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def preprocess(content: bytes):
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(content)).convert("RGB").resize((224, 224))
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # mobilenet_v2.preprocess_input


def build_model():
    import tensorflow as tf

    return tf.keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False, pooling="avg", weights=None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--predict-batch-udf", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    import numpy as np
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (
        SparkSession.builder.master("local[*]").appName("peer")
        .config("spark.driver.memory", "4g")
        # A decoded image is 150,528 floats: 32 per Arrow batch for predict_batch_udf (its batch size)
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "32" if args.predict_batch_udf else "256")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )  # fmt: skip
    spark.sparkContext.setLogLevel("ERROR")
    images = (
        spark.read.format("binaryFile")
        .option("pathGlobFilter", "*.{jpg,png}")  # the bench writes both
        .option("recursiveFileLookup", "true")
        .load(args.input)
        .withColumn("label", F.element_at(F.split(F.col("path"), "/"), -2))
        # In its favour: one partition per core, so each core builds the network once (binaryFile would make a
        # partition per 32 small files, and the iterator UDF rebuilds the network for each).
        .repartition(spark.sparkContext.defaultParallelism)
    )
    model = build_model()
    model.load_weights(args.weights)
    weights = spark.sparkContext.broadcast(model.get_weights())

    if args.predict_batch_udf:
        from pyspark.ml.functions import predict_batch_udf

        @F.udf("array<float>")
        def decode(content):
            return preprocess(content).reshape(-1).tolist()

        def make_predict_fn():
            net = build_model()
            net.set_weights(weights.value)

            def predict(inputs):
                return net.predict(inputs, batch_size=32, verbose=0)

            return predict

        from pyspark.sql.types import ArrayType, FloatType

        featurize = predict_batch_udf(make_predict_fn, return_type=ArrayType(FloatType()), batch_size=32,
                                      input_tensor_shapes=[[224, 224, 3]])  # fmt: skip
        features = images.select("path", "label", featurize(decode("content")).alias("features"))
    else:

        @F.pandas_udf("array<float>")
        def featurize(content_batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            net = build_model()
            net.set_weights(weights.value)
            for content in content_batches:
                batch = np.stack([preprocess(c) for c in content])
                yield pd.Series(list(net.predict(batch, batch_size=32, verbose=0)))

        features = images.select("path", "label", featurize("content").alias("features"))

    features_dir = os.path.join(args.output, "features")
    features.write.mode("overwrite").parquet(features_dir)
    featurized = time.perf_counter()

    stored = spark.read.parquet(features_dir).withColumn("vector", array_to_vector("features"))
    pca = PCA(k=args.k, inputCol="vector", outputCol="pca_vector").fit(stored)
    coords = pca.transform(stored).select("path", "label", vector_to_array("pca_vector").alias("pca"))
    coords.write.mode("overwrite").parquet(os.path.join(args.output, "pca"))
    rows = spark.read.parquet(os.path.join(args.output, "pca")).count()
    spark.stop()
    end = time.perf_counter()
    print(json.dumps({"rows": rows, "wall_s": round(end - start, 2), "featurize_s": round(featurized - start, 2),
                      "pca_s": round(end - featurized, 2)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
