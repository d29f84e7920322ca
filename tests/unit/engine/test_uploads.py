"""A backbone's weights upload is checked on arrival: HDF5 by its signature, then Keras's
top-level groups."""

from __future__ import annotations

import h5py
import keras
import pytest

from stepstream_service.engine import uploads
from stepstream_service.errors import DatasetInvalid


def test_a_keras_weights_file_is_taken_and_other_hdf5_is_refused(tmp_path):
    good = tmp_path / "m.weights.h5"
    inputs = keras.Input((3,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save_weights(good)
    uploads.check(good, "weights", 1 << 30)
    other = tmp_path / "o.weights.h5"
    with h5py.File(other, "w") as f:
        f["data"] = [1.0, 2.0]
    refused = r"has no layers or vars group \(top-level groups: none"
    with pytest.raises(DatasetInvalid, match=refused):
        uploads.check(other, "weights", 1 << 30)
    text = tmp_path / "t.weights.h5"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetInvalid, match="not an HDF5 file"):
        uploads.check(text, "weights", 1 << 30)
