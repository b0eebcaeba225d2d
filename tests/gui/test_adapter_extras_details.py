"""The details pane names the non-projector tensors an adapter file carries into merges."""

from __future__ import annotations

import torch

from tests.factories import make_mlp_projector
from tests.gui.conftest import wait_idle


def test_details_pane_lists_carried_tensors(qtbot, window, tmp_path):  # type: ignore[no-untyped-def]
    sd = dict(make_mlp_projector(d_in=8, d_hidden=16, d_out=12).original_state_dict())
    sd["model.embed_tokens.weight"] = torch.zeros(10, 12, dtype=torch.float16)
    path = tmp_path / "mm_projector.bin"
    torch.save(sd, path)
    window.add_paths([str(path)])
    wait_idle(qtbot, window)
    window.list_panel.view.selectRow(0)
    text = window.list_panel.details.toPlainText()
    assert "Carried: other tensors of the adapter file" in text
    assert "model.embed_tokens.weight [10, 12] float16" in text
