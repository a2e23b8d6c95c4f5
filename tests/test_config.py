import subprocess
import sys
import warnings

import pytest

from tailorpo.config import DEFAULT_STEPS, PAPER_STEPS, ConfigError, ConfigWarning, dump_config, load_config


def load_without_warning(path, overrides=()):
    """The config, failing on any warning at load (a ConfigWarning above all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path, list(overrides))


def test_launch_configs_are_valid():
    cfg = load_without_warning("launch/tiny.yaml")
    assert cfg.model.pretrained == "tiny-sd" and cfg.algorithm.name == "tailorpo"
    paper = load_without_warning("launch/tailorpo.yaml")
    assert (paper.model.pretrained, paper.model.resolution, paper.train.total_samples) == (
        "runwayml/stable-diffusion-v1-5", 512, 10_000)
    assert paper.sampling.batch_size == 2 and paper.runtime.samplers >= 1
    assert paper.reward.launch[0].name == "aesthetic" and paper.reward.launch[0].resources.num_gpus == 1
    # the offline pair objectives: one YAML each, on real hub ids, with their papers' / public scripts' settings
    names = ("dpo_sd15", "diff_contrast_sd15", "mapo_sdxl")
    dpo, contrast, mapo = (load_config(f"launch/{name}.yaml") for name in names)
    assert [c.algorithm.name for c in (dpo, contrast, mapo)] == ["diffusion_dpo", "diff_contrast", "mapo"]
    assert dpo.model.pretrained == contrast.model.pretrained == "runwayml/stable-diffusion-v1-5"
    assert mapo.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0" and mapo.model.resolution == 1024
    for pair_cfg in (dpo, contrast, mapo):
        assert pair_cfg.pairs.source == "yuvalkirstain/pickapic_v2" and pair_cfg.pairs.streaming
    assert dpo.pairs.beta == contrast.pairs.beta == 2000 and contrast.pairs.diff_contrast.tau == 0.01
    assert (mapo.pairs.mapo.beta_mapo, mapo.pairs.mapo.snr_value) == (0.1, 0.5)
    assert contrast.pairs.diff_contrast.clip_model == "openai/clip-vit-large-patch14"
    defaults = load_without_warning(None)
    # the paper's setup and D3PO's public defaults, but for where the LoRA trains and acts: the paper's steps plus
    # the low-noise tail, the LoRA gated to them
    assert defaults.model.pretrained == "runwayml/stable-diffusion-v1-5" and defaults.model.resolution == 512
    assert DEFAULT_STEPS == (20, 16, 12, 8, 4, 3, 2, 1) and PAPER_STEPS == (20, 16, 12, 8, 4)
    assert defaults.algorithm.fine_tuned_steps == list(DEFAULT_STEPS) and defaults.sampling.batch_size == 2
    assert defaults.lora.active_steps == "trained" and defaults.adapter_steps() == list(DEFAULT_STEPS)
    assert defaults.untrained_adapter_steps() == []
    assert (defaults.optim.lr, defaults.algorithm.beta, defaults.algorithm.ratio_clip) == (3e-5, 0.1, 0.1)
    # the launch files on the default steps say so, and load without a warning
    for name in ("tiny", "shapes", "tailorpo"):
        launch = load_without_warning(f"launch/{name}.yaml")
        assert launch.algorithm.fine_tuned_steps == list(DEFAULT_STEPS), name
        assert launch.lora.active_steps == "trained", name
    # the paper's preset: its 5 steps with the LoRA at all 20, which warns that 15 steps are never trained
    with pytest.warns(ConfigWarning, match=r"the LoRA acts at steps k = \[19, 18, 17, 15, .*3, 2, 1\], which are "
                      "never trained"):
        preset = load_config("launch/paper_sd15.yaml")
    assert preset.algorithm.fine_tuned_steps == list(PAPER_STEPS) and preset.lora.active_steps == "all"
    assert preset.adapter_steps() is None and len(preset.untrained_adapter_steps()) == 15
    assert preset.model.pretrained == "runwayml/stable-diffusion-v1-5" and preset.model.resolution == 512


def test_overrides_are_typed():
    cfg = load_config("launch/tiny.yaml", ["optim.lr=2e-4", "algorithm.fine_tuned_steps=[20, 10]",
                                            "algorithm.ratio_clip=null", "reward.name=colorfulness"])
    assert cfg.optim.lr == 2e-4 and cfg.algorithm.fine_tuned_steps == [20, 10]
    assert cfg.algorithm.ratio_clip is None


def test_yaml_11_booleans_stay_strings_for_enums_and_still_set_booleans(tmp_path):
    """PyYAML reads `no` as False (YAML 1.1), which the documented `mixed_precision: no` would fail on."""
    assert load_config("launch/tiny.yaml", ["optim.mixed_precision=no"]).optim.mixed_precision == "no"
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  mixed_precision: no\nalgorithm:\n  guidance:\n    through_unet: off\n")
    cfg = load_config(path)
    assert cfg.optim.mixed_precision == "no" and cfg.algorithm.guidance.through_unet is False
    assert load_config(path, ["algorithm.guidance.through_unet=yes"]).algorithm.guidance.through_unet is True
    assert load_config(path, ["algorithm.guidance.through_unet=true"]).algorithm.guidance.through_unet is True

@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=-1"], "optim.lr: Input should be greater than 0"),
        (["optim.learning_rate=1e-4"], "optim.learning_rate: unknown field"),
        (["algorithm.name=ppo"], "algorithm.name: Input should be"),
        (["sampling.num_steps=abc"], "sampling.num_steps: Input should be a valid integer"),
        (["algorithm.fine_tuned_steps=[25]"], "algorithm.fine_tuned_steps: [25] not in 1..sampling.num_steps=20"),
        (["algorithm.name=tailorpo_g"], "'tailorpo_g' needs a differentiable reward"),
        (["algorithm.fine_tuned_steps=[20, 20]"], "repeats a step"),
        (["reward.name=aesthetics"], "reward.name: unknown reward 'aesthetics'; choose one of aesthetic, "),
        (["runtime.samplers=1", "reward.launch=[{name: aesthetics}]"],
         "reward.launch.0: name: unknown reward 'aesthetics'"),
        (["optim.lr"], "expected KEY=VALUE"),
        (["optim.lr.x=1"], "'lr' is a value, not a section"),
        (["runtime.samplers=1", "reward.launch=[{name: jpeg, tls_cert: c.pem}]"], "tls_cert and tls_key: give both"),
        (["reward.tls_client_cert=c.pem"], "tls_client_cert and tls_client_key: give both"),
        (["reward.tls_client_cert=c.pem", "reward.tls_client_key=c.key"], "only sent over TLS; set tls_ca"),
        (["runtime.samplers=1", "reward.launch=[{name: jpeg, tls_client_ca: ca.pem}]"],
         "tls_client_ca (mutual TLS) needs the server's own tls_cert"),
        (["runtime.samplers=1", "reward.tls_ca=s.pem",
          "reward.launch=[{name: jpeg, tls_cert: s.pem, tls_key: s.key, tls_client_ca: ca.pem}]"],
         "accepts only clients with a certificate; set reward.tls_client_cert"),
    ],
)
def test_bad_fields_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("launch/tiny.yaml", overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")


def test_dumped_config_loads_back_equal(tmp_path):
    cfg = load_config("launch/tiny.yaml", ["optim.lr=5e-4"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    steps = load_config("launch/tiny.yaml", ["algorithm.branch_steps=all", "algorithm.train_steps={random: 5}",
                                             "lora.active_steps=trained"])
    dump_config(steps, tmp_path / "steps.yaml")
    assert load_config(tmp_path / "steps.yaml") == steps and steps.algorithm.train_steps.random == 5


def test_fine_tuned_steps_alone_set_where_the_sampler_branches_and_the_learner_trains():
    with pytest.warns(ConfigWarning):  # the LoRA acts at all 20 steps, trained at 2
        cfg = load_config(None, ["algorithm.fine_tuned_steps=[20, 10]", "lora.active_steps=all"])
    assert (cfg.algorithm.branch_steps, cfg.algorithm.train_steps, cfg.lora.active_steps) == (None, None, "all")
    assert cfg.algorithm.branch_selection == cfg.algorithm.train_selection == ("algorithm.fine_tuned_steps", [20, 10])
    assert cfg.trained_steps() == [20, 10] and cfg.adapter_steps() is None
    # with the default gate (lora.active_steps: trained) they also set where the LoRA acts
    gated = load_without_warning(None, ["algorithm.fine_tuned_steps=[20, 10]"])
    assert (gated.algorithm.branch_steps, gated.algorithm.train_steps, gated.lora.active_steps) == (
        None, None, "trained")
    assert gated.trained_steps() == gated.adapter_steps() == [20, 10] and gated.untrained_adapter_steps() == []
    split = load_config(None, ["algorithm.branch_steps=[20, 15, 10]", "algorithm.train_steps=[15]",
                               "lora.active_steps=trained"])
    assert split.trained_steps() == [15] and split.adapter_steps() == [15] and split.untrained_adapter_steps() == []


def test_cli_rejects_a_bad_field_before_loading_any_model():
    code = (
        "import sys; from tailorpo.cli import main; "
        "rc = main(['train', 'launch/tiny.yaml', '--set', 'optim.lrr=1']); "
        "print('diffusers loaded:', 'diffusers' in sys.modules); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "optim.lrr: unknown field" in proc.stderr and "Traceback" not in proc.stderr
    assert "diffusers loaded: False" in proc.stdout


def test_the_cli_tells_a_config_warning_as_one_line(capsys):
    """The paper's setting (its 5 steps, the LoRA at all 20) leaves steps untrained while the LoRA acts on them:
    one `warning:` line names them. Gated, or with the defaults, there is nothing to tell."""
    from tailorpo.cli import load_config_telling_warnings

    paper = [f"algorithm.fine_tuned_steps={list(PAPER_STEPS)}"]
    load_config_telling_warnings("launch/tiny.yaml", [*paper, "lora.active_steps=all"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: lora.active_steps='all'") and "k = [19," in err[0]
    load_config_telling_warnings("launch/tiny.yaml", [*paper, "lora.active_steps=trained"])
    assert capsys.readouterr().err == ""
    load_config_telling_warnings("launch/tiny.yaml", [])
    assert capsys.readouterr().err == ""
