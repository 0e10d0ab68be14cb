"""MobileNetV2 without TensorFlow: its layer graph (network_spec.py, generated from Keras), weights files read
with h5py, and the same network as an ONNX model for ONNX Runtime.

network_spec.py is what `tf.keras.applications.MobileNetV2(include_top=False, pooling="avg")` builds, written
by `python -m emr_job.network` with TensorFlow present (a Python module, since the job ships as a zip of .py
files); a test regenerates it and compares, so it cannot drift from Keras. The ONNX model is assembled layer by
layer from it, and a test checks its features equal Keras'."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

SPEC_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "network_spec.py")
CONFIG_KEYS = {  # what each layer's ONNX node needs from its Keras config
    "Conv2D": ("filters", "kernel_size", "strides", "padding", "use_bias"),
    "DepthwiseConv2D": ("depth_multiplier", "kernel_size", "strides", "padding", "use_bias"),
    "BatchNormalization": ("epsilon",),
    "ReLU": ("max_value", "negative_slope", "threshold"),
    "ZeroPadding2D": ("padding",),
    "Add": (),
    "GlobalAveragePooling2D": (),
    "InputLayer": ("batch_shape",),
}
OPSET = 17
AUTO_NAMES = {"InputLayer": "input", "GlobalAveragePooling2D": "avg_pool"}  # the layers MobileNetV2 leaves unnamed


class WeightsFileError(ValueError):
    """A weights file that does not fit the network; the message names the file and the layer."""


def spec_from_keras(net) -> dict:
    """The layer graph of a built Keras model, with each weighted layer's variable shapes and its key in a
    Keras 3 `.weights.h5` file (layers are saved as <class in snake case>[_<n-th of that class>])."""
    from keras.src.utils.naming import to_snake_case

    seen: dict = {}
    layers = []
    configs = net.get_config()["layers"]
    # Keras numbers the layers it names itself per process (input_layer_1, ...): fixed names here.
    fixed = {c["name"]: AUTO_NAMES[c["class_name"]] for c in configs if c["class_name"] in AUTO_NAMES}
    for layer, config in zip(net.layers, configs):
        kind = config["class_name"]
        if kind not in CONFIG_KEYS:
            raise ValueError(f"layer {layer.name}: {kind} has no ONNX translation here")
        count = seen.get(kind, 0)
        seen[kind] = count + 1
        inputs = [fixed.get(n, n) for n in (h["config"]["keras_history"][0] for h in _tensors(config["inbound_nodes"]))]
        entry = {"name": fixed.get(layer.name, layer.name), "class": kind, "inputs": inputs,
                 "config": {k: config["config"][k] for k in CONFIG_KEYS[kind]}}  # fmt: skip
        if layer.weights:
            entry["file_key"] = to_snake_case(kind) + (f"_{count}" if count else "")
            entry["shapes"] = [list(w.shape) for w in layer.weights]
        layers.append(entry)
    net_spec = {"network": "MobileNetV2(input_shape=(224, 224, 3), include_top=False, pooling='avg')", "layers": layers}
    return json.loads(json.dumps(net_spec))  # lists, not tuples, as network_spec.py holds them


def _tensors(node) -> list:
    if isinstance(node, dict):
        if node.get("class_name") == "__keras_tensor__":
            return [node]
        return [t for v in node.values() for t in _tensors(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in _tensors(v)]
    return []


def spec() -> dict:
    from emr_job.network_spec import SPEC

    return SPEC


def weighted_layers() -> list:
    return [layer for layer in spec()["layers"] if "shapes" in layer]


# --- weights files ---------------------------------------------------------------------------------------
def read_weights(path: str) -> list:
    """The arrays of a Keras weights file, in the order Keras' get_weights() gives them; h5py only.

    Reads Keras 3 `.weights.h5` files (model.save_weights) and legacy Keras 2 HDF5 files (layer names as groups,
    as the keras-applications ImageNet files). Raises WeightsFileError naming what does not fit."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsFileError(f"not an HDF5 file ({exc})") from None
    with fh:
        legacy = fh.get("model_weights", fh)
        if "layers" in fh and "layer_names" not in legacy.attrs:
            groups = {layer["name"]: _keras3_group(fh, layer) for layer in weighted_layers()}
        elif "layer_names" in legacy.attrs:
            groups = {layer["name"]: _legacy_group(legacy, layer) for layer in weighted_layers()}
        else:
            raise WeightsFileError("neither a Keras 3 .weights.h5 file nor a legacy Keras HDF5 weights file")
        arrays = []
        for layer in weighted_layers():
            values = groups[layer["name"]]
            if [list(v.shape) for v in values] != layer["shapes"]:
                raise WeightsFileError(
                    f"layer {layer['name']} has weights of shapes {[list(v.shape) for v in values]}, "
                    f"the network needs {layer['shapes']}"
                )
            arrays += [np.asarray(v, np.float32) for v in values]
        return arrays


def _keras3_group(fh, layer: dict) -> list:
    key = f"layers/{layer['file_key']}/vars"
    if key not in fh:
        raise WeightsFileError(f"no weights for layer {layer['name']} ({key})")
    group = fh[key]
    return [group[str(i)][()] for i in range(len(group))]


def _legacy_group(fh, layer: dict) -> list:
    if layer["name"] not in fh:
        raise WeightsFileError(f"no weights for layer {layer['name']}")
    group = fh[layer["name"]]
    return [
        group[name][()] for name in (n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"])
    ]


# --- the ONNX model --------------------------------------------------------------------------------------
def onnx_model(arrays: list) -> bytes:
    """MobileNetV2 with these weights (get_weights() order) as a serialized ONNX model: uint8 NHWC images
    [n, 224, 224, 3] in ("images"), 1280 features per image out ("features"), preprocessing included."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    weights = iter(arrays)

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    out, size = {}, {}  # layer -> ONNX tensor name, and its (height, width)
    for layer in spec()["layers"]:
        name, kind, cfg = layer["name"], layer["class"], layer["config"]
        x = [out[i] for i in layer["inputs"]]
        y = name
        if kind == "InputLayer":
            nodes += [
                helper.make_node("Cast", ["images"], ["x_float"], to=TensorProto.FLOAT),
                helper.make_node("Div", ["x_float", const("scale", 127.5)], ["x_scaled"]),
                helper.make_node("Sub", ["x_scaled", const("one", 1.0)], ["x_nhwc"]),
                helper.make_node("Transpose", ["x_nhwc"], [y], perm=[0, 3, 1, 2]),  # ONNX convolutions are NCHW
            ]
        elif kind in ("Conv2D", "DepthwiseConv2D"):
            kernel = next(weights)
            if kind == "Conv2D":  # Keras (kh, kw, in, out) -> ONNX (out, in, kh, kw)
                w, group = kernel.transpose(3, 2, 0, 1), 1
            else:  # (kh, kw, in, multiplier) -> (in * multiplier, 1, kh, kw), one group per input channel
                kh, kw, cin, mult = kernel.shape
                w, group = kernel.reshape(kh, kw, cin * mult, 1).transpose(2, 3, 0, 1), cin
            inputs = [x[0], const(f"{name}/kernel", w)]
            if cfg["use_bias"]:
                inputs.append(const(f"{name}/bias", next(weights)))
            pads, size[name] = _conv_pads(size[layer["inputs"][0]], cfg)
            nodes.append(helper.make_node("Conv", inputs, [y], group=group, strides=cfg["strides"],
                                          kernel_shape=cfg["kernel_size"], pads=pads))  # fmt: skip
        elif kind == "BatchNormalization":
            params = [const(f"{name}/{p}", next(weights)) for p in ("gamma", "beta", "mean", "var")]
            nodes.append(helper.make_node("BatchNormalization", [x[0], *params], [y], epsilon=cfg["epsilon"]))
        elif kind == "ReLU":
            if cfg["negative_slope"] or cfg["threshold"]:
                raise ValueError(f"layer {name}: only ReLU(max_value) is translated")
            bounds = [const(f"{name}/min", 0.0), const(f"{name}/max", cfg["max_value"])]
            nodes.append(helper.make_node("Clip", [x[0], *bounds], [y]))
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = cfg["padding"]
            pads = np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)
            h, w = size[layer["inputs"][0]]
            size[name] = (h + top + bottom, w + left + right)
            inits.append(numpy_helper.from_array(pads, f"{name}/pads"))
            nodes.append(helper.make_node("Pad", [x[0], f"{name}/pads"], [y], mode="constant"))
        elif kind == "Add":
            nodes.append(helper.make_node("Add", x, [y]))
        elif kind == "GlobalAveragePooling2D":
            nodes += [helper.make_node("GlobalAveragePool", x, [f"{name}/pooled"]),
                      helper.make_node("Flatten", [f"{name}/pooled"], ["features"], axis=1)]  # fmt: skip
            y = "features"
        out[name] = y
        if name not in size:  # layers that keep the spatial size
            size[name] = size[layer["inputs"][0]] if layer["inputs"] else tuple(cfg["batch_shape"][1:3])
    if next(weights, None) is not None:
        raise WeightsFileError("more weight arrays than the network has")
    graph = helper.make_graph(
        nodes, "mobilenet_v2_features",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["n", 224, 224, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 1280])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="emr_job")
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    return model.SerializeToString()


def with_projection(features_model: bytes, mean: np.ndarray, components: np.ndarray, metadata: dict) -> bytes:
    """The network (onnx_model's bytes) followed by a PCA projection: a second output "pca" (n, k) float32,
    (features - mean) @ components.T, computed in float32 so that any ONNX runtime can run it. metadata: strings
    stored as the model's metadata_props."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(features_model)
    graph, k = model.graph, len(components)
    graph.initializer.extend([numpy_helper.from_array(np.asarray(mean, np.float32), "pca/mean"),
                              numpy_helper.from_array(np.ascontiguousarray(components.T, np.float32),
                                                      "pca/components_t")])  # fmt: skip
    graph.node.extend([helper.make_node("Sub", ["features", "pca/mean"], ["pca/centred"]),
                       helper.make_node("MatMul", ["pca/centred", "pca/components_t"], ["pca"])])  # fmt: skip
    graph.output.append(helper.make_tensor_value_info("pca", TensorProto.FLOAT, ["n", k]))
    graph.name = "mobilenet_v2_features_pca"
    helper.set_model_props(model, {str(key): str(value) for key, value in metadata.items()})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _conv_pads(size: tuple, cfg: dict) -> tuple:
    """Explicit ONNX pads [top, left, bottom, right] and the output size. TensorFlow's "same" puts the odd
    pixel at the end. Explicit pads, not auto_pad: ONNX Runtime then folds the ZeroPadding2D layers into them."""
    pads, out = [0, 0, 0, 0], []
    for axis, (n, k, s) in enumerate(zip(size, cfg["kernel_size"], cfg["strides"])):
        if cfg["padding"] == "same":
            out.append(-(-n // s))
            total = max((out[-1] - 1) * s + k - n, 0)
            pads[axis], pads[axis + 2] = total // 2, total - total // 2
        else:
            out.append((n - k) // s + 1)
    return pads, tuple(out)


def main() -> int:
    """Regenerate network_spec.py from Keras (needs TensorFlow)."""
    from pprint import pformat

    from emr_job.model import build_network

    body = pformat(spec_from_keras(build_network()), width=116, sort_dicts=False)
    with open(SPEC_FILE, "w", encoding="utf-8") as fh:
        fh.write(f'"""Generated by `python -m emr_job.network` from Keras; do not edit."""\n\nSPEC = {body}\n')
    print(f"wrote {SPEC_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
