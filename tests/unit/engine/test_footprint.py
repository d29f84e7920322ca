"""engine.footprint: a job's peak memory from its spec alone, an upload's arrays from its
headers, and the memory limits a worker lives under."""

from __future__ import annotations

import io
import resource
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stepstream.kernel import names
from stepstream.kernel.spec import JobSpec
from stepstream_service.engine import footprint as fp
from stepstream_service.errors import DatasetInvalid

GiB = 2**30

SPECS = {
    "mlp": {
        "dataset": {
            "name": "synthetic_classification",
            "num_samples": 50,
            "num_features": 7,
            "num_classes": 3,
        },
        "model": {
            "architecture": "mlp",
            "hidden_units": [16, 8],
            "batch_normalization": True,
            "dropout": 0.1,
        },
    },
    "cnn": {
        "dataset": {"name": "synthetic_images", "num_samples": 50, "image_size": 12, "channels": 3},
        "model": {
            "architecture": "cnn",
            "filters": [4, 6],
            "dense_units": [10],
            "batch_normalization": True,
        },
    },
    "rnn-on-images": {
        "dataset": {"name": "synthetic_images", "num_samples": 50, "image_size": 8},
        "model": {
            "architecture": "rnn",
            "cell": "gru",
            "units": [5, 6],
            "bidirectional": True,
            "dense_units": [4],
        },
    },
    "rnn-on-tokens": {
        "dataset": {
            "name": "synthetic_sequence",
            "num_samples": 50,
            "vocab_size": 30,
            "sequence_length": 9,
        },
        "model": {"architecture": "rnn", "cell": "lstm", "units": [5], "embedding_dim": 7},
    },
    "rnn-on-reals": {
        "dataset": {"name": "synthetic_sequence", "num_samples": 50, "num_features": 3},
        "model": {"architecture": "rnn", "cell": "simple_rnn", "units": [5, 4]},
    },
    "layers-with-embedding": {
        "dataset": {"name": "synthetic_sequence", "num_samples": 50, "vocab_size": 40},
        "model": {
            "architecture": "layers",
            "layers": [
                {"type": "embedding", "output_dim": 6},
                {"type": "gru", "units": 5},
                {"type": "lstm", "units": 4},
                {"type": "dense", "units": 3},
            ],
        },
    },
    "layers-on-images": {
        "dataset": {"name": "synthetic_images", "num_samples": 50, "image_size": 16},
        "model": {
            "architecture": "layers",
            "layers": [
                {"type": "conv2d", "filters": 4, "kernel_size": 3, "strides": 2},
                {"type": "max_pool2d", "pool_size": 2, "padding": "same"},
                {"type": "batch_normalization"},
                {"type": "conv2d", "filters": 3, "padding": "same"},
                {"type": "flatten"},
                {"type": "dense", "units": 5},
                {"type": "dropout", "rate": 0.2},
            ],
        },
    },
    "layers-attention-graph": {
        "dataset": {"name": "synthetic_sequence", "num_samples": 50, "vocab_size": 30},
        "model": {
            "architecture": "layers",
            "layers": [
                {"type": "embedding", "output_dim": 8, "positional": True, "name": "tokens"},
                {"type": "dense", "units": 6, "name": "memory"},
                {
                    "type": "multi_head_attention",
                    "num_heads": 2,
                    "key_dim": 3,
                    "name": "self",
                    "inputs": ["tokens"],
                },
                {"type": "add", "inputs": ["tokens", "self"]},
                {"type": "layer_normalization", "name": "normed"},
                {
                    "type": "multi_head_attention",
                    "num_heads": 3,
                    "key_dim": 2,
                    "dropout": 0.1,
                    "inputs": ["normed", "memory", "tokens"],
                },
                {"type": "global_average_pool1d"},
                {"type": "dense", "units": 4},
            ],
        },
    },
    "layers-sequence-graph": {
        "dataset": {
            "name": "synthetic_sequence",
            "num_samples": 50,
            "vocab_size": 20,
            "sequence_length": 12,
        },
        "model": {
            "architecture": "layers",
            "output": "scaled",
            "layers": [
                {"type": "embedding", "output_dim": 5},
                {"type": "conv1d", "filters": 6, "padding": "causal", "name": "c"},
                {
                    "type": "separable_conv1d",
                    "filters": 5,
                    "depth_multiplier": 2,
                    "padding": "same",
                },
                {"type": "depthwise_conv1d", "depth_multiplier": 2, "strides": 2},
                {"type": "max_pool1d", "padding": "same"},
                {"type": "upsampling1d", "size": 3},
                {"type": "average_pool1d", "pool_size": 3},
                {"type": "simple_rnn", "units": 4},
                {"type": "position_embedding"},
                {"type": "bidirectional", "cell": "gru", "units": 3, "merge_mode": "sum"},
                {"type": "bidirectional", "units": 4, "name": "b"},
                {"type": "global_max_pool1d", "inputs": ["c"], "name": "g"},
                {"type": "concatenate", "inputs": ["b", "g"], "name": "joined"},
                {"type": "dense", "units": 14, "name": "gate"},
                {"type": "multiply", "inputs": ["joined", "gate"]},
                {"type": "group_normalization", "groups": 7},
                {"type": "reshape", "target_shape": [2, -1]},
                {"type": "activation", "activation": "tanh"},
                {"type": "rescaling", "scale": 0.5, "name": "scaled"},
            ],
        },
    },
    "layers-image-graph": {
        "dataset": {"name": "synthetic_images", "num_samples": 50, "image_size": 12, "channels": 3},
        "model": {
            "architecture": "layers",
            "layers": [
                {"type": "random_flip", "mode": "horizontal"},
                {"type": "random_rotation", "factor": 0.1},
                {"type": "random_zoom", "factor": 0.1},
                {"type": "random_contrast", "factor": 0.2},
                {"type": "random_crop", "height": 10, "width": 9},
                {"type": "rescaling", "scale": 2.0, "offset": -1.0},
                {"type": "conv2d", "filters": 4, "name": "a"},
                {
                    "type": "separable_conv2d",
                    "filters": 4,
                    "depth_multiplier": 2,
                    "padding": "same",
                },
                {"type": "depthwise_conv2d", "padding": "same", "name": "d"},
                {"type": "add", "inputs": ["a", "d"], "name": "sum"},
                {"type": "average_pool2d"},
                {"type": "upsampling2d", "interpolation": "bilinear"},
                {"type": "conv2d_transpose", "filters": 3, "strides": 2},
                {"type": "conv2d_transpose", "filters": 2, "kernel_size": 2, "padding": "same"},
                {"type": "global_average_pool2d", "name": "g1"},
                {"type": "global_max_pool2d", "inputs": ["sum"], "name": "g2"},
                {"type": "concatenate", "inputs": ["g1", "g2"]},
                {"type": "reshape", "target_shape": [3, 2]},
                {"type": "flatten"},
                {"type": "dense", "units": 3},
            ],
        },
    },
    "linear-regression": {"dataset": {"name": "linear"}, "model": "linear", "loss": "mse"},
    "binary": {
        "dataset": {"name": "synthetic_classification", "num_classes": 2},
        "loss": "binary_crossentropy",
        "model": {"architecture": "mlp", "hidden_units": [3]},
    },
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_parameter_count_is_the_one_keras_builds(name):
    from stepstream_service.engine import datasets, models

    spec = JobSpec.parse(SPECS[name])
    model = models.build(spec, datasets.load(spec, datasets.DataPaths(download=False)))
    assert fp.estimate(spec).params == model.count_params()


def test_the_parameter_counts_cover_every_layer():
    layers = [
        layer["type"]
        for spec in SPECS.values()
        if isinstance(spec["model"], dict)
        for layer in spec["model"].get("layers", [])
    ]
    assert set(layers) == set(names.LAYERS)


def test_the_activations_grow_with_an_attention_layer():
    spec = SPECS["layers-attention-graph"]
    fewer = {**spec["model"], "layers": spec["model"]["layers"][:2]}  # embedding, dense
    small = fp.estimate(JobSpec.parse({**spec, "model": fewer}))
    full = fp.estimate(JobSpec.parse(spec))
    assert full.activations > small.activations and full.params > small.params


@pytest.mark.parametrize(
    ("optimizer", "slots"),
    [
        ({"name": "adam"}, 2),
        ({"name": "adam", "amsgrad": True}, 3),
        ({"name": "sgd"}, 0),
        ({"name": "sgd", "momentum": 0.5}, 1),
        ({"name": "momentum"}, 1),
        ({"name": "rmsprop", "centered": True}, 2),
        ({"name": "ftrl"}, 2),
        ({"name": "lion"}, 1),
    ],
)
def test_optimizer_slots_are_the_variables_keras_makes(optimizer, slots):
    from stepstream_service.engine import datasets, models
    from stepstream_service.engine.registry import OPTIMIZERS

    spec = JobSpec.parse({**SPECS["mlp"], "optimizer": optimizer})
    model = models.build(spec, datasets.load(spec, datasets.DataPaths(download=False)))
    opt = OPTIMIZERS.get(spec.optimizer.name)(spec.optimizer)
    opt.build(model.trainable_variables)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    made = sum(int(np.prod(v.shape)) for v in opt.variables if len(v.shape))
    assert fp.optimizer_slots(spec) == slots
    assert made == slots * trainable


def test_the_oversized_jobs_of_the_issue_are_sized_from_the_spec_alone():
    wide = JobSpec.parse(
        {
            "dataset": {"name": "synthetic_classification", "num_features": 8},
            "model": {"architecture": "mlp", "hidden_units": [16384] * 64},
        }
    )
    need = fp.estimate(wide)
    assert 60 * GiB < need.weights < 70 * GiB  # 64 x 16384 units: about 17 billion weights
    assert need.optimizer >= 2 * need.weights  # adam: two slots per weight
    assert need.total > 200 * GiB
    assert "weights 63.0 GiB" in need.describe()

    embedding = fp.estimate(
        JobSpec.parse(
            {
                "dataset": {"name": "synthetic_sequence", "vocab_size": 1_000_000},
                "model": {"architecture": "rnn", "embedding_dim": 16384},
            }
        )
    )
    assert embedding.weights > 60 * GiB

    data = fp.estimate(
        JobSpec.parse(
            {
                "dataset": {
                    "name": "synthetic_classification",
                    "num_samples": 10_000_000,
                    "num_features": 100_000,
                },
                "model": {"architecture": "mlp", "hidden_units": [4]},
            }
        )
    )
    assert data.data > 4 * 10**12  # 10^12 float32 inputs at least

    images = {
        "x_train": fp.ArrayInfo((2, 10000, 10000), np.dtype("uint8")),
        "y_train": fp.ArrayInfo((2,), np.dtype("int64")),
    }
    npz = JobSpec.parse({"dataset": {"name": "npz", "path": "uploads/a.npz"}})
    assert fp.estimate(npz, images).total > 100 * GiB  # flattened: 10^8 inputs per example


def test_a_small_job_is_small_and_the_estimate_is_cheap():
    spec = JobSpec.parse(SPECS["mlp"])
    need = fp.estimate(spec)
    assert need.total < 64 * 2**20
    assert need.total == need.model + need.data


def npz_bytes(compressed: bool = True, **arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(out, **arrays)
    return out.getvalue()


def test_npz_arrays_are_read_from_the_headers(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes(x_train=np.zeros((5, 3), "float32"), y_train=np.arange(5)))
    arrays = fp.npz_arrays(path)
    assert arrays["x_train"].shape == (5, 3) and arrays["x_train"].dtype == np.float32
    assert fp.check_npz(arrays, 10**6) == 5 * 3 * 4 + 5 * 8


def test_an_npz_that_expands_too_far_is_refused_by_its_headers():
    # 200 MB of zeros compress to a few hundred KB; only the headers are read.
    big = npz_bytes(x=np.zeros((2, 10000, 10000), "uint8"), y=np.zeros(2, "int64"))
    assert len(big) < 1_000_000
    arrays = fp.npz_arrays(io.BytesIO(big))
    with pytest.raises(DatasetInvalid, match=r"190.7 MiB.*max_upload_expanded_bytes"):
        fp.check_npz(arrays, 10**6)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip at all", "not a zip archive"),
        ("notes", "not a .npy array"),
        ("pickled", "Python objects"),
        ("no-labels", "holds 'x_train'; expected"),
        ("rows", "x_train has 3 rows but y_train has 2"),
        ("cut", "cut short"),
    ],
)
def test_what_the_loader_could_not_read_is_refused_saying_what_was_expected(content, message):
    if content == "notes":
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("readme.txt", "hello")
        content = out.getvalue()
    elif content == "pickled":
        content = npz_bytes(x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    elif content == "no-labels":
        content = npz_bytes(x_train=np.zeros((3, 2)))
    elif content == "rows":
        content = npz_bytes(x_train=np.zeros((3, 2)), y_train=np.zeros(2))
    elif content == "cut":
        out = io.BytesIO()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f4", "fortran_order": False, "shape": (1000, 1000)}
        )
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("x.npy", header.getvalue() + b"\0" * 16)
            z.writestr("y.npy", header.getvalue())
        content = out.getvalue()
    with pytest.raises(DatasetInvalid, match=message) as caught:
        fp.check_npz(fp.npz_arrays(io.BytesIO(content)), 10**9)
    assert "/" not in str(caught.value).split("expected")[0]  # no server path


def test_an_npz_token_vocabulary_is_read_from_the_values(tmp_path):
    path = tmp_path / "tokens.npz"
    path.write_bytes(npz_bytes(x=np.array([[1, 2, 999], [3, 4, 5]]), y=np.array([0, 1])))
    spec = JobSpec.parse(
        {"dataset": {"name": "npz", "path": "tokens.npz"}, "model": {"architecture": "rnn"}}
    )
    need = fp.estimate(spec, fp.npz_arrays(path), path)
    assert need.params > 1000 * 32  # an embedding of 1000 ids x 32


def test_local_npz_stays_inside_the_uploads_folder(tmp_path):
    (tmp_path / "uploads" / "a").mkdir(parents=True)
    (tmp_path / "uploads" / "a" / "d.npz").write_bytes(b"x")
    (tmp_path / "secret.npz").write_bytes(b"x")
    (tmp_path / "uploads" / "a" / "link.npz").symlink_to(tmp_path / "secret.npz")
    assert fp.local_npz(tmp_path, "uploads/a/d.npz") == (tmp_path / "uploads/a/d.npz").resolve()
    for bad in ("secret.npz", "uploads/../secret.npz", "uploads/a/link.npz", "/etc/passwd", ""):
        assert fp.local_npz(tmp_path, bad) is None


# ---------------------------------------------------------------- limits


def fake_root(tmp_path: Path, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    (tmp_path / "proc/self/status").write_text("VmRSS:\t  102400 kB\nVmSize:\t 2048000 kB\n")
    (tmp_path / "proc/meminfo").write_text(
        "MemTotal:       67108864 kB\nMemAvailable:   33554432 kB\n"
    )
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_cgroup_v2_limit_up_the_tree_wins_over_the_machine(tmp_path):
    root = fake_root(
        tmp_path,
        "0::/pod/worker\n",
        {
            "sys/fs/cgroup/cgroup.controllers": "memory",
            "sys/fs/cgroup/pod/memory.max": str(8 * GiB),
            "sys/fs/cgroup/pod/memory.current": str(GiB),
            "sys/fs/cgroup/pod/memory.stat": f"anon 1\ninactive_file {GiB // 2}\n",
            "sys/fs/cgroup/pod/worker/memory.max": "max",
        },
    )
    found = fp.headroom(root)
    assert found.limit == 8 * GiB and found.used == GiB // 2 and "memory.max" in found.source
    assert fp.capacity(root).capacity == 8 * GiB - 100 * 2**20


def test_a_cgroup_v1_hierarchical_limit_is_read_and_no_limit_is_the_machine(tmp_path):
    files = {
        "sys/fs/cgroup/memory/memory.stat": f"hierarchical_memory_limit {4 * GiB}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(GiB),
    }
    root = fake_root(tmp_path / "a", "4:memory:/docker/abc\n", files)
    found = fp.headroom(root)
    assert found.limit == 4 * GiB and "limit_in_bytes" in found.source
    unlimited = {
        "sys/fs/cgroup/memory/memory.stat": "hierarchical_memory_limit 9223372036854771712\n"
    }
    root = fake_root(tmp_path / "b", "4:memory:/\n", unlimited)
    assert fp.headroom(root).source == "the machine's memory"
    assert fp.headroom(root).limit == 64 * GiB


def test_an_address_space_rlimit_is_a_limit(tmp_path, monkeypatch):
    real = resource.getrlimit

    def limited(which):
        return (6 * GiB, resource.RLIM_INFINITY) if which == resource.RLIMIT_AS else real(which)

    monkeypatch.setattr(fp.resource, "getrlimit", limited)
    root = fake_root(tmp_path, "0::/\n", {})
    found = fp.headroom(root)
    assert found.limit == 6 * GiB and "RLIMIT_AS" in found.source
    assert found.used == 2048000 * 1024  # VmSize: what the address space already holds


def test_a_gpu_worker_registers_its_device_memory(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 143771\n")  # MiB, as --format=csv,noheader,nounits
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path), prepend=":")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert fp.gpu_memory() == 143771 * 2**20
    assert fp.worker_memory(gpus=1) == 143771 * 2**20
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert fp.gpu_memory() is None
    host = fp.worker_memory(gpus=1)  # then the host's, which moves as this process runs
    assert abs(host - fp.capacity().capacity) < 256 * 2**20


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_file_read_whole_counts_its_rows_and_a_streamed_one_its_buffer(tmp_path, fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60_000, 9)).astype(np.float32)
    file = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        np.savetxt(file, x, fmt="%.3f", delimiter=",", header=",".join("abcdefghy"), comments="")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: x[:, i] for i, c in enumerate("abcdefghy")}), file)

    def data(stream: bool) -> int:
        ds = {"name": fmt, "path": f"uploads/d.{fmt}", "label": "y", "stream": stream}
        spec = JobSpec.model_validate({"dataset": ds, "model": {"architecture": "mlp"}})
        return fp.estimate(spec, None, file).data

    whole, streamed = data(False), data(True)
    # Read whole: at least the inputs as float32 (60,000 rows of 8); streamed: the buffer.
    assert whole >= 60_000 * 8 * 4 > streamed
    assert streamed < (10_000 + 4 * 32) * 10 * 4 * 3
