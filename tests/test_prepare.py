"""`python -m pipeline.prepare`: every key in --help; bad input is one line and exit status 2, before any work."""

import json

import pytest

from pipeline import prepare
from pipeline.config import field_help


@pytest.fixture
def folders(tmp_path):
    """Model folders with only their config files (enough for the checks before work) and one video."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKLWan", "z_dim": 16, "dim_mult": [1, 2, 4, 4],
        "temperal_downsample": [False, True, True]}))
    (tmp_path / "te").mkdir()
    (tmp_path / "te" / "config.json").write_text(json.dumps({"architectures": ["UMT5EncoderModel"]}))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "videos").mkdir()
    for name in ("a", "b"):
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"")
    return [f"videos={tmp_path / 'videos'}", f"output={tmp_path / 'out'}", f"vae={tmp_path / 'vae'}",
            f"text_encoder={tmp_path / 'te'}", f"tokenizer={tmp_path / 'tok'}", "heldout=1"]


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exc:
        prepare.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    keys = [k for k, _, _ in field_help(prepare.PrepareConfig)]
    for key in ("videos", "output", "vae", "text_encoder", "tokenizer", "frames", "height", "width", "fps", "heldout"):
        assert key in keys
    assert all(f"  {k} (default" in out for k in keys)


@pytest.mark.parametrize("override, message", [
    ("frames=80", "error: frames: 80 is not 4k + 1 (the VAE would silently drop the trailing frames); use e.g. 77"),
    ("height=484", "error: height: 484 is not a positive multiple of the VAE's spatial factor 8"),
    ("vae=/no/such/folder", "error: vae: /no/such/folder is not a local model folder (no config.json)"),
    ("heldout=2", "error: heldout: 2 of 2 clips leaves no training clip"),
    ("fps=0", "error: fps: must be > 0"),
    ("colour=red", "error: colour: unknown key; valid keys here: "),
])
def test_bad_input_is_one_line_and_exit_status_2(folders, tmp_path, capsys, override, message):
    assert prepare.main([*folders, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "out").exists()  # before any work


def test_a_vae_folder_of_another_class_is_refused(folders, tmp_path, capsys):
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert prepare.main(folders) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vae: ") and err.strip().endswith("expected AutoencoderKLWan")
