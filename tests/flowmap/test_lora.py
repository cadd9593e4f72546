"""LoRA adapters (pipeline/flowmap/lora.py): they start at the base network, only they train, the
adapter-only state moves between networks, and a merged, exported student loads in plain diffusers
(no peft) and computes what the adapted one does; the reference trains adapters only."""

import subprocess
import sys

import pytest
import torch

from pipeline.flowmap import lora, models
from pipeline.flowmap.models import StudentFn

SETTINGS = lora.LoraSettings(rank=2, alpha=4.0)


def _net(kind: str):
    teacher = models.build_teacher("tiny", seed=0)
    return teacher if kind == "critic" else models.student_from_teacher(teacher)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    z, cond = torch.randn(2, 4, 4, 8, 8, generator=g), torch.randn(2, 8, 16, generator=g)
    t = torch.tensor([0.8, 0.4])
    return z, t, t * 0.5, cond


def _expected_adapter_numel(plain: torch.nn.Module, settings: lora.LoraSettings) -> int:
    """rank x (in + out) for every linear layer whose name ends with a target, counted on the plain network."""
    return sum(settings.rank * (m.in_features + m.out_features) for name, m in plain.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in settings.targets))


def _perturb(model, seed=3, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora.adapter_parameters(model).items()):
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("kind", ["student", "critic"])
def test_adapters_start_at_the_base_network_and_only_they_are_trainable(kind):
    plain = _net(kind)
    adapted = lora.add_adapters(_net(kind), SETTINGS, lora.init_generator(0, "stage2", kind))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_parameters(adapted))
    assert sum(adapted.get_parameter(n).numel() for n in trainable) == _expected_adapter_numel(plain, SETTINGS)
    fn = StudentFn if kind == "student" else models.VelocityFn
    z, t, r, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(fn(adapted)(z, t, r, cond), fn(plain)(z, t, r, cond))  # B = 0: exactly the base
    # the initialisation is a function of (seed, stage, network): equal when rebuilt, different for another seed
    again = lora.add_adapters(_net(kind), SETTINGS, lora.init_generator(0, "stage2", kind))
    other = lora.add_adapters(_net(kind), SETTINGS, lora.init_generator(1, "stage2", kind))
    a, b, c = (lora.adapter_state_dict(m) for m in (adapted, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if ".lora_A." in k)


def test_the_adapter_state_moves_between_networks_and_a_mismatch_is_refused():
    src = lora.add_adapters(_net("student"), SETTINGS, lora.init_generator(0, "stage2", "student"))
    _perturb(src)
    dst = lora.add_adapters(_net("student"), SETTINGS, lora.init_generator(5, "stage2", "student"))
    state = lora.adapter_state_dict(src)
    assert all(".lora_" in k for k in state)
    lora.load_adapter_state_dict(dst, state)
    z, t, r, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(StudentFn(dst)(z, t, r, cond), StudentFn(src)(z, t, r, cond))
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter_state_dict(dst, dict(list(state.items())[1:]))
    wider = lora.add_adapters(_net("student"), lora.LoraSettings(3, 4.0), lora.init_generator(0, "stage2", "student"))
    with pytest.raises(ValueError, match="shape"):
        lora.load_adapter_state_dict(wider, state)


EXPORTED_OUTPUT = """
import sys
sys.modules["peft"] = None  # any import of peft fails: the folder must load without it
import torch
from diffusers import AnyFlowTransformer3DModel
from pipeline.flowmap.models import StudentFn
folder, inputs, out = sys.argv[1:4]
z, t, r, cond = torch.load(inputs)
model = AnyFlowTransformer3DModel.from_pretrained(folder, subfolder="transformer").eval()
assert not any("lora" in n or "base_layer" in n for n, _ in model.named_parameters())
with torch.no_grad():
    torch.save(StudentFn(model)(z, t, r, cond), out)
"""


def test_an_adapter_trained_student_exports_merged_and_plain_diffusers_loads_it_with_the_same_output(tmp_path):
    from safetensors import safe_open

    from pipeline.config import load_config
    from pipeline.sampling import export_student

    adapted = lora.add_adapters(_net("student"), SETTINGS, lora.init_generator(0, "stage2", "student")).eval()
    _perturb(adapted)
    merged = lora.merged(adapted)
    assert not lora.has_adapters(merged) and lora.has_adapters(adapted)  # the adapted network is left as it was
    folder = export_student(load_config(None, ["model.size=tiny"]), merged, tmp_path / "student")
    with safe_open(folder / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == set(_net("student").state_dict())  # the plain model's keys, nothing of peft

    z, t, r, cond = inputs = _inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    proc = subprocess.run([sys.executable, "-c", EXPORTED_OUTPUT, str(folder), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        want, base = StudentFn(adapted)(z, t, r, cond), StudentFn(_net("student").eval())(z, t, r, cond)
    assert (exported - want).abs().max() < 1e-5
    assert (want - base).abs().max() > 1e-2  # the adapters do change the output, so the match means something


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from pipeline import reference
    from pipeline.config import load_config
    from pipeline.data.schema import read_null_embed, read_split
    from pipeline.stages import prepare_data

    out = tmp_path_factory.mktemp("lora_data")
    cfg = load_config(None, ["model.size=tiny", "data.toy.frames=4", "data.toy.height=8", "data.toy.width=8",
                             "data.toy.num_train=32", "data.toy.num_heldout=8", "data.toy.embed_dim=16",
                             "data.toy.shard_rows=32", f"run.output_dir={out}"])
    data_dir = prepare_data(cfg)
    return reference.TrainData.from_dataset(read_split(data_dir, "train"), read_null_embed(data_dir)), out


def test_the_reference_with_lora_changes_only_the_target_layers_each_by_a_rank_r_update(tiny_data):
    """Three stage-2 steps at rank 2: every non-target tensor of the merged student and critic equals
    the input network's bit for bit, and every target weight moved by a matrix of rank <= 2."""
    from pipeline import reference
    from pipeline.config import load_config

    data, out = tiny_data
    cfg = load_config(None, ["model.size=tiny", f"run.output_dir={out}", "stage2.steps=3", "stage2.batch_size=2",
                             "stage2.num_steps_choices=[1, 2]", "stage2.lora_rank=2", "stage2.optim.ema=0.0",
                             "stage2.optim.lr=0.01", "stage2.critic_optim.lr=0.01"])
    teacher = models.build_teacher("tiny", seed=0)
    student = models.student_from_teacher(teacher)
    got_student, got_critic = reference.train_stage2(cfg, "stage2", student, teacher, data, lambda *a: None)
    for got, base in ((got_student, student), (got_critic, teacher)):
        assert not lora.has_adapters(got)
        targets = {f"{n}.weight" for n in lora.target_layers(base, lora.DEFAULT_TARGETS)}
        new, old = got.state_dict(), base.state_dict()
        assert set(new) == set(old)
        for key in old:
            delta = (new[key] - old[key]).double()
            if key in targets:
                assert 0 < torch.linalg.matrix_rank(delta, atol=1e-5) <= 2, key
            else:
                assert torch.equal(new[key], old[key]), key
