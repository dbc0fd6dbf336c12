"""Reading an export: its config asset and what its graph holds (no tfcert needed to use
the results; `tfcert.export.saved_model` checks every export with `forbidden_ops`)."""

from __future__ import annotations

import json
import os

import tensorflow as tf

CONFIG_ASSET = "tfcert_config.json"
# Ops that must never appear in an exported graph: Python callbacks (they run only in the
# process that built the graph) and XLA (TF Serving GPU builds fail on it with "Could not
# find compiler for platform CUDA").
FORBIDDEN_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc", "XlaLaunch",
                           "_XlaCompile", "_XlaRun", "XlaCallModule"})
XLA_ATTRIBUTE = "_XlaMustCompile"


def read_config(path: str) -> dict:
    """The ``tfcert_config.json`` asset of an export (plain JSON, no TensorFlow needed)."""
    with open(os.path.join(path, "assets", CONFIG_ASSET)) as f:
        return json.load(f)


def graph_defs(path: str):
    """The SavedModel proto's meta graphs (what TF Serving and saved_model_cli read)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto.meta_graphs


def forbidden_ops(path: str) -> set[str]:
    """Forbidden op types (:data:`FORBIDDEN_OPS`) and XLA-compiled functions in a SavedModel.

    Scans every node of the graph and of every function in its library.
    """
    found = set()
    for meta_graph in graph_defs(path):
        graph = meta_graph.graph_def
        functions = list(graph.library.function)
        for node in [*graph.node, *(n for fn in functions for n in fn.node_def)]:
            if node.op in FORBIDDEN_OPS:
                found.add(node.op)
            if XLA_ATTRIBUTE in node.attr and node.attr[XLA_ATTRIBUTE].b:
                found.add(f"{XLA_ATTRIBUTE} on {node.op}")
        for fn in functions:
            if XLA_ATTRIBUTE in fn.attr and fn.attr[XLA_ATTRIBUTE].b:
                found.add(f"{XLA_ATTRIBUTE} on function {fn.signature.name}")
    return found


def signature_summary(path: str) -> str:
    """The signatures of a SavedModel, formatted like ``saved_model_cli show --all``."""
    lines = []
    for meta_graph in graph_defs(path):
        for key in sorted(k for k in meta_graph.signature_def if not k.startswith("__")):
            sig = meta_graph.signature_def[key]
            lines.append(f"signature_def['{key}']:")
            for kind, infos in (("inputs", sig.inputs), ("outputs", sig.outputs)):
                lines.append(f"  The given SavedModel SignatureDef contains the following "
                             f"{kind[:-1]}(s):")
                for name in sorted(infos):
                    info = infos[name]
                    dims = tuple(d.size for d in info.tensor_shape.dim)
                    dtype = tf.dtypes.as_dtype(info.dtype).name
                    lines.append(f"    {kind}['{name}']: {dtype} {dims}")
            lines.append(f"  Method name is: {sig.method_name}")
    return "\n".join(lines)
