"""Model families (ncp/families): the registry, detection from a pipeline folder, the shared noise-process interface,
and that nothing outside ncp/families asks which family or which process it has."""

import re
from pathlib import Path

import pytest
import torch

from ncp import families
from ncp.config import EncoderConfig, ModelConfig, ObjectiveConfig, load_config
from ncp.diffusion import Schedule
from ncp.errors import NcpError
from ncp.flow import FlowSchedule
from ncp.models import load_models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models run fastest single-threaded (conftest)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd3", "sd3")


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from ncp.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", "flux")


@pytest.fixture(scope="module")
def folders(tiny_sd15, tiny_sdxl, tiny_sd3, tiny_flux):
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


def test_registry_names_and_lookup():
    assert families.names() == ("flux", "sd15", "sd3", "sdxl")  # the package's modules, in name order
    assert all(families.get(n).name == n for n in families.names())
    with pytest.raises(NcpError, match="model.arch must be one of flux, sd15, sd3, sdxl, got 'sd4'"):
        families.get("sd4")
    assert families.from_model_id("stabilityai/stable-diffusion-xl-base-1.0").name == "sdxl"
    assert families.from_model_id("stabilityai/stable-diffusion-3.5-medium").name == "sd3"
    assert families.from_model_id("black-forest-labs/FLUX.1-schnell").name == "flux"
    assert families.from_model_id("someone/my-model").name == families.DEFAULT


def test_every_tiny_folder_is_detected_as_its_family_and_loads_as_it(folders):
    for name, folder in folders.items():
        claims = [f.name for f in families.FAMILIES.values() if f.detect(folder)]
        assert claims == [name]  # exactly one family claims each folder
        models = load_models(str(folder))
        assert models.family is families.get(name) and models.arch == name
        assert models.unet is models.denoiser and families.of_denoiser(models.denoiser) is models.family
        assert type(models.denoiser).__name__ == type(getattr(
            models.family.pipeline_class.from_pretrained(folder, **models.family.pipeline_extras(
                ModelConfig())), models.family.denoiser_key)).__name__


def test_unknown_folder_is_one_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet3DConditionModel"}')
    with pytest.raises(NcpError, match=re.escape(f"model.pretrained={str(tmp_path)!r}: no known model family")):
        families.detect(tmp_path)
    with pytest.raises(NcpError, match=re.escape(str(tmp_path / "empty"))):
        load_models(str(tmp_path / "empty"))


def test_each_family_answers_the_whole_protocol():
    """A family overrides every question the base class cannot answer (what a new family must implement)."""
    required = ("load", "encode_prompts", "noise_process", "encoder", "tiny", "example_cond")
    for family in families.FAMILIES.values():
        assert all(getattr(type(family), m) is not getattr(families.Family, m) for m in required), family
        assert family.name and family.pipeline_name and family.hub_tag and family.denoiser_key and family.denoiser_class
        assert family.config_files(ROOT), f"{family.name}: no configs/ file matches {family.configs}"


def test_every_training_config_belongs_to_exactly_one_family():
    owners = {}
    for family in families.FAMILIES.values():
        for path in family.config_files(ROOT):
            owners.setdefault(path, []).append(family.name)
            arch = load_config(str(path)).model.arch
            assert arch in (None, family.name), f"{path.name}: model.arch={arch} in {family.name}'s configs"
    assert all(len(v) == 1 for v in owners.values()), owners
    assert set(owners) == set((ROOT / "configs").glob("*.yaml"))


def test_the_processes_share_one_interface(folders):
    """DDPM: t' = t - 1, target eps, the denoiser takes t. Flow: t' = t + 1, target v = eps - x0, it takes
    sigma * 1000. Both: the step is affine in the prediction with slope step_coef."""
    ddpm = families.get("sd15").noise_process(load_models(str(folders["sd15"])).scheduler, ObjectiveConfig())
    flow = families.get("sd3").noise_process(load_models(str(folders["sd3"])).scheduler, ObjectiveConfig())
    assert isinstance(ddpm, Schedule) and isinstance(flow, FlowSchedule)
    t = torch.tensor([5, 0, 999])
    x0, eps, z = (torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                  for i in range(3))
    assert torch.equal(ddpm.next_t(t), torch.tensor([4, 0, 998])) and torch.equal(flow.next_t(t), t + 1)
    assert torch.equal(ddpm.target(x0, eps), eps) and torch.equal(flow.target(x0, eps), eps - x0)
    assert torch.equal(ddpm.model_timestep(t), t)
    assert torch.allclose(flow.model_timestep(t).double(), flow.sigmas[t] * 1000, atol=1e-3)
    for process in (ddpm, flow):
        assert process.num_timesteps == 1000
        x_t = process.q_sample(x0, t, eps)
        pred = process.target(x0, eps)
        gap = process.step(x_t, t, pred + 1.0, z) - process.step(x_t, t, pred, z)
        assert torch.allclose(gap, process.step_coef(t).view(-1, 1, 1, 1).expand_as(gap), atol=1e-9)
    with pytest.raises(NcpError, match="target=uniform"):
        flow.renoise(x_t, t, pred, t)


def test_family_parts_have_the_shapes_the_denoiser_takes(folders):
    for name, folder in folders.items():
        models = load_models(str(folder))
        family, denoiser = models.family, models.denoiser
        f = family.encoder(denoiser, EncoderConfig(error="difference"))
        x = torch.randn(2, family.latent_channels(denoiser), 16, 16)
        assert x.shape[1] == models.vae.config.latent_channels
        cond = family.example_cond(denoiser, 2, 32)
        timestep = family.noise_process(models.scheduler, ObjectiveConfig()).model_timestep(torch.tensor([10, 500]))
        with torch.no_grad():
            assert family.denoise(denoiser, x, timestep, cond).shape == x.shape
            assert f(x, timestep, cond).shape[0] == 2


def test_linearized_recomputation_checkpoints_f_with_the_lora_off(folders):
    """Under the base's gradient checkpointing, the linearized error's backward (f's own, recomputed in
    `ncp.encoder._Linearized`) runs f's blocks inside checkpoints, whose recomputation keeps the LoRA off: the
    tangent's gradient equals the one without checkpointing (float64, a LoRA far from zero). An f call whose
    backward runs after it (the difference's policy call) checkpoints none of f's blocks."""
    from torch.utils.checkpoint import checkpoint

    from ncp.models import add_lora

    for name, folder in folders.items():
        models = load_models(str(folder))
        family, denoiser = models.family, models.denoiser
        f = family.encoder(denoiser, EncoderConfig(error="linearized"))
        params = add_lora(denoiser, rank=4)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.normal_(generator=torch.Generator().manual_seed(i))
        denoiser.double().train()
        lora = next(m for m in denoiser.modules() if hasattr(m, "lora_A"))
        lora_off = []

        def counted(fn, *args, **kwargs):
            def run(*a, **k):
                lora_off.append(lora.disable_adapters)
                return fn(*a, **k)
            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        x = torch.randn(2, family.latent_channels(denoiser), 16, 16, dtype=torch.float64)
        cond = family.example_cond(denoiser, 2, 32).to(dtype=torch.float64)
        timestep = family.noise_process(models.scheduler, ObjectiveConfig()).model_timestep(torch.tensor([10, 500]))
        tangent = torch.randn_like(x)
        grads = []
        for checkpointing in (False, True):
            if checkpointing:
                denoiser.enable_gradient_checkpointing(counted)
            tan = tangent.clone().requires_grad_()
            grads.append(torch.autograd.grad(f.jvp(x, timestep, cond, [tan])[0].square().sum(), tan)[0])
        assert lora_off and all(lora_off), name
        assert grads[0].abs().max() > 0 and torch.allclose(grads[1], grads[0], rtol=1e-10, atol=0), name
        lora_off.clear()
        f(x.clone().requires_grad_(), timestep, cond).square().sum().backward()
        assert not lora_off, name


# what branches on a family or a process type: a comparison with a family's name, or an isinstance of a schedule
NAMES = "|".join(families.names())
BRANCH = re.compile(rf"""(==|!=)\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)|\b(in|not in)\s*[(\[{{][^)\]}}]*["']({NAMES})["']"""
                    r"""|isinstance\([^)]*Schedule|endswith\(["']({NAMES})["']\)""")
LITERAL = re.compile(rf"""["']({NAMES})["']""")


def test_nothing_outside_the_families_branches_on_a_family():
    """Outside ncp/families no code in ncp/, benchmarks/ or the scripts compares a family's name or asks a
    schedule's type; inside ncp/ (outside ncp/families) no family is even named in a string."""
    files = [p for p in (ROOT / "ncp").rglob("*.py") if "families" not in p.relative_to(ROOT).parts]
    files += sorted((ROOT / "benchmarks").glob("*.py")) + sorted(ROOT.glob("train_*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if BRANCH.search(code) or (path.is_relative_to(ROOT / "ncp") and LITERAL.search(code)):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
    assert BRANCH.search('if models.arch == "sd3":') and BRANCH.search("isinstance(schedule, FlowSchedule)")
