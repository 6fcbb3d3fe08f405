#!/usr/bin/env python3
"""Loads a model exported by `orchestrator export` with safetensors and numpy, runs its forward
pass over a dataset's test split, and checks the accuracy the job reported.

usage: check_export.py EXPORT_DIR DATA_DIR [--tolerance 1e-4]
Prints one JSON line: {"accuracy": ..., "reported": ..., "samples": ...}; exits 1 on a mismatch.
"""
import argparse
import gzip
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def windows(x, shape, kernel, stride, padding=0):
    """A flat [n, c*h*w] batch as [n, c, oh, ow, kernel, kernel] windows."""
    c, h, w = shape
    x = x.reshape(-1, c, h, w)
    if padding:
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    v = np.lib.stride_tricks.sliding_window_view(x, (kernel, kernel), axis=(2, 3))
    return v[:, :, ::stride, ::stride]


def forward(graph, params, features):
    """Evaluates every node once its inputs are known; answers the loss node's logits."""
    data = graph["data"]
    values = {data.get("features", "image"): features}
    nodes = {n["id"]: n for n in graph["node"]}
    shapes = {data.get("features", "image"): data.get("shape")}
    # Sources by port: an edge without a port takes the kind's first port not yet fed, in
    # edge order (docs/MODEL_FORMAT.md).
    ports = {"add": ["a", "b"], "concat": ["a", "b"]}
    inputs = {}
    for e in graph["edge"]:
        if e["from"] == data.get("labels", "label"):
            continue
        names = ports.get(nodes[e["to"]]["kind"], ["in"])
        fed = inputs.setdefault(e["to"], {})
        port = e.get("port") or next(p for p in names if p not in fed)
        fed[port] = e["from"]
    inputs = {to: [fed[p] for p in sorted(fed, key=lambda p: (p != "logits", p))] for to, fed in inputs.items()}
    logits = None
    pending = list(nodes)
    while pending:
        progressed = False
        for name in list(pending):
            srcs = inputs.get(name, [])
            if not all(s in values for s in srcs):
                continue
            n, xs = nodes[name], [values[s] for s in srcs]
            kind = n["kind"]
            shape = shapes.get(srcs[0]) if srcs else None
            out_shape = shape if kind in ("relu", "tanh", "gelu", "dropout", "layer_norm", "add") else None
            if kind == "linear":
                y = xs[0] @ params[f"{name}.weight"] + params[f"{name}.bias"]
            elif kind == "relu":
                y = np.maximum(xs[0], np.float32(0))
            elif kind == "tanh":
                y = np.tanh(xs[0])
            elif kind == "gelu":
                erf = np.vectorize(math.erf, otypes=[np.float64])
                y = 0.5 * xs[0] * (1.0 + erf(xs[0] / math.sqrt(2.0)))
            elif kind == "layer_norm":
                centred = xs[0] - xs[0].mean(axis=1, keepdims=True)
                var = (centred * centred).mean(axis=1, keepdims=True)
                y = centred / np.sqrt(var + np.float32(1e-5)) * params[f"{name}.weight"] + params[f"{name}.bias"]
            elif kind == "dropout":
                y = xs[0]
            elif kind == "add":
                y = xs[0] + xs[1]
            elif kind == "concat":
                y = np.concatenate([xs[0], xs[1]], axis=1)
            elif kind == "conv2d":
                k, st, pad = n["kernel"], n.get("stride", 1), n.get("padding", 0)
                win = windows(xs[0], shape, k, st, pad)  # [n, c, oh, ow, k, k]
                wgt = params[f"{name}.weight"]  # [out, c, k, k]
                y = np.einsum("ncxyij,ocij->noxy", win, wgt, optimize=True)
                y = y + params[f"{name}.bias"][None, :, None, None]
                out_shape = list(y.shape[1:])
                y = y.reshape(y.shape[0], -1)
            elif kind in ("max_pool2d", "avg_pool2d"):
                k = n["kernel"]
                win = windows(xs[0], shape, k, n.get("stride", k))
                y = win.max(axis=(4, 5)) if kind == "max_pool2d" else win.mean(axis=(4, 5))
                out_shape = list(y.shape[1:])
                y = y.reshape(y.shape[0], -1)
            elif kind == "flatten":
                y = xs[0]
            elif kind == "reshape":
                y, out_shape = xs[0], n["shape"]
            elif kind == "softmax_cross_entropy":
                y = logits = xs[0]
            else:
                raise SystemExit(f"node {name}: kind {kind} is not supported by this check")
            values[name] = y.astype(np.float32)
            shapes[name] = out_shape
            pending.remove(name)
            progressed = True
        if not progressed:
            raise SystemExit(f"cannot order nodes {pending}")
    return logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("data_dir")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    a = ap.parse_args()
    graph = json.load(open(os.path.join(a.export_dir, "graph.json")))
    summary = json.load(open(os.path.join(a.export_dir, "summary.json")))
    params = load_file(os.path.join(a.export_dir, "model.safetensors"))
    d = graph["data"]
    norm = d.get("normalize", {"mean": 0.0, "std": 1.0})
    root = os.path.join(a.data_dir, d["dataset"])
    images = idx(os.path.join(root, "t10k-images-idx3-ubyte.gz")).reshape(-1, d["feature_size"])
    labels = idx(os.path.join(root, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
    # The same table a VNode builds: (x / 255 - mean) / std in f32.
    table = ((np.arange(256, dtype=np.float32) / np.float32(255)) - np.float32(norm["mean"])) / np.float32(norm["std"])
    logits = forward(graph, params, table[images])
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    reported = summary["test_accuracy"]
    print(json.dumps({"accuracy": accuracy, "reported": reported, "samples": int(labels.size)}))
    if abs(accuracy - reported) > a.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
