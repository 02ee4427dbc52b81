"""Hostile and messy inputs: code planted in a checkpoint never runs (pickles below a checkpoint, code that a checkpoint
ships), inputs are never written over, --overwrite_output_dir removes only what runs wrote, and what used to pass in
silence or end in a traceback stops with one sentence that names the cause.

Most checks call the shared helpers in this process; a few run a script (the tiny preset, refused before training).
"""

import contextlib
import json
import os
import pty
import signal
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from test_safety import GS, RunsAShellCommand, one_sentence

from conftest import SCRIPTS, run_forked, run_script
from hftrain.errors import UserError


@pytest.fixture
def own_process_state(monkeypatch):
    """check_output_dir sets sys.excepthook (a full disk becomes one sentence): put pytest's back afterwards."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


# ---------------------------------------------------------------- nothing below a checkpoint is unpickled


def trainer_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_zero3_files_are_checked_before_deepspeed_unpickles_them(tmp_path):
    import pickle

    from hftrain.checkpoints import resolve_checkpoint

    checkpoint = trainer_checkpoint(tmp_path / "checkpoint-2")
    (checkpoint / "latest").write_text("global_step2")
    (checkpoint / "global_step2").mkdir()
    planted = checkpoint / "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "marker"
    torch.save(RunsAShellCommand(marker), planted)
    with pytest.raises(UserError, match="holds global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt, which only unpickling"):
        resolve_checkpoint("latest", str(tmp_path))
    assert not marker.exists()
    # What DeepSpeed's TorchCheckpointEngine.load does with it on resume: the planted command runs.
    torch.load(planted, weights_only=False)
    assert marker.exists()

    planted.write_bytes(pickle.dumps(RunsAShellCommand(marker)))  # a bare pickle, as torch.load's legacy format
    marker.unlink()
    with pytest.raises(UserError, match="is incomplete or damaged .global_step2/.*optim_states.pt is cut short"):
        resolve_checkpoint(str(checkpoint), str(tmp_path))
    (checkpoint / "latest").write_text("../../elsewhere")  # DeepSpeed loads from the folder `latest` names
    planted.unlink()
    with pytest.raises(UserError, match="holds latest"):
        resolve_checkpoint("latest", str(tmp_path))
    assert not marker.exists()


def test_zero3_files_that_hold_only_deepspeed_state_still_resume(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from hftrain.checkpoints import resolve_checkpoint

    checkpoint = trainer_checkpoint(tmp_path / "checkpoint-2")
    (checkpoint / "latest").write_text("global_step2")
    (checkpoint / "global_step2").mkdir()
    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "fp32_flat_groups": [torch.zeros(4)]}
    torch.save({"optimizer_state_dict": state, "ds_version": "0.19"}, checkpoint / "global_step2/optim_states.pt")
    assert resolve_checkpoint("latest", str(tmp_path)) == str(checkpoint)


def test_sharded_fsdp_checkpoint_is_refused_not_unpickled(tmp_path):
    import pickle

    from hftrain.checkpoints import resolve_checkpoint

    checkpoint = trainer_checkpoint(tmp_path / "checkpoint-2")
    (checkpoint / "pytorch_model_fsdp_0").mkdir()
    marker = tmp_path / "marker"
    (checkpoint / "pytorch_model_fsdp_0/.metadata").write_bytes(pickle.dumps(RunsAShellCommand(marker)))
    with pytest.raises(UserError, match="is a sharded FSDP checkpoint .*FULL_STATE_DICT"):
        resolve_checkpoint(str(checkpoint), str(tmp_path))
    assert not marker.exists()


# ---------------------------------------------------------------- no code from a checkpoint without --trust_remote_code

PLANTED_CODE = """import pathlib
pathlib.Path({marker!r}).touch()
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class PlantedConfig(PretrainedConfig):
    model_type = "planted"
class PlantedTokenizer(PreTrainedTokenizerFast):
    pass
"""


def ships_code(folder: Path, marker: Path, config: bool = True) -> Path:
    """A checkpoint folder whose config (or tokenizer) names its own Python module: importing it touches `marker`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "planted.py").write_text(PLANTED_CODE.format(marker=str(marker)))
    if config:
        (folder / "config.json").write_text(
            json.dumps({"model_type": "planted", "auto_map": {"AutoConfig": "planted.PlantedConfig"}})
        )
    tokenizer = {"tokenizer_class": "PlantedTokenizer", "auto_map": {"AutoTokenizer": [None, "planted.PlantedTokenizer"]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


def test_code_in_a_checkpoint_does_not_run_when_a_terminal_answers_yes(workdir, tmp_path, monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" when trust_remote_code is not passed and a terminal
    is attached; every load passes it, and a folder that ships code is refused before any load."""
    import transformers.dynamic_module_utils

    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    model = ships_code(tmp_path / "model", marker)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Some text to train on.\n\nAnother document.\n" * 20)
    args = [sys.executable, str(SCRIPTS / GS), "--model", str(model), "--dataset", str(corpus), "--max_steps", "1"]
    primary, secondary = pty.openpty()  # the script's stdin: a terminal, on which "y" is typed again and again
    os.set_blocking(primary, False)
    typing = threading.Event()

    def type_yes() -> None:
        while not typing.wait(0.1):
            with contextlib.suppress(BlockingIOError):  # the terminal's input is full: nobody reads it
                os.write(primary, b"y\n")

    typist = threading.Thread(target=type_yes)
    typist.start()
    try:
        proc = run_forked([*args, "--output_dir", str(tmp_path / "out")], tmp_path, timeout=300, stdin=secondary)
    finally:
        typing.set()
        typist.join()
        os.close(primary)
        os.close(secondary)
    assert proc is not None, "the script did not finish"
    assert not marker.exists(), "the checkpoint's code ran"
    one_sentence(
        proc, f"--model {model} ships its own Python code (auto_map in config.json), which runs only with --trust_remote_code"
    )


def test_every_config_and_tokenizer_load_passes_trust_remote_code(workdir, tmp_path, monkeypatch):
    """The loads before a training script's own checks: the model's positions, a --tokenizer in preparation, the
    prepared tokenizer, the checkpoint's own tokenizer. Each asked on a terminal; here input() answers "y"."""
    import transformers.dynamic_module_utils

    from hftrain.data import PrepareArguments, load_prepared, prepare
    from hftrain.models import check_tokenizer_matches, model_positions

    monkeypatch.setattr("builtins.input", lambda *args: "y")
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = tmp_path / "marker"
    tokenizer_only = ships_code(tmp_path / "tok", marker, config=False)
    assert model_positions(str(ships_code(tmp_path / "model", marker))) == (None, str(tmp_path / "model"))
    with pytest.raises(UserError, match="--tokenizer .* ships its own Python code"):
        prepare(
            PrepareArguments(
                dataset="synthetic", output_dir=str(tmp_path / "data"), tokenizer=str(tokenizer_only), num_examples=50
            )
        )
    prepared = tmp_path / "prepared"
    prepare(PrepareArguments(output_dir=str(prepared), num_examples=100))
    ships_code(prepared / "tokenizer", marker, config=False)
    info = json.loads((prepared / "info.json").read_text())
    del info["files"]  # as prepared before the files were hashed (a changed file is refused before the tokenizer loads)
    (prepared / "info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="the prepared tokenizer .* ships its own Python code"):
        load_prepared(str(prepared))
    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    with pytest.raises(ValueError, match="contains custom code"):  # transformers refuses: nothing of it runs
        check_tokenizer_matches(str(tokenizer_only), types.SimpleNamespace(vocab_size=10**6), tokenizer)
    assert not marker.exists(), "a checkpoint's code ran"


# ---------------------------------------------------------------- inputs are never written over


def test_output_dir_that_is_the_model_folder_is_refused_even_with_overwrite(workdir, start_checkpoint):
    weights = Path(start_checkpoint, "model.safetensors").read_bytes()
    proc = run_script(
        GS,
        *["--model", start_checkpoint, "--output_dir", start_checkpoint, "--overwrite_output_dir", "--max_steps", "1"],
        cwd=workdir,
        check=False,
    )
    one_sentence(proc, f"--output_dir {start_checkpoint} is --model {start_checkpoint} itself")
    assert "--overwrite_output_dir" not in proc.stderr
    assert Path(start_checkpoint, "model.safetensors").read_bytes() == weights


def test_output_dir_never_holds_or_sits_in_an_input(workdir, start_checkpoint, tmp_path, own_process_state):
    from hftrain.cli import check_output_dir

    data = workdir / "data/synthetic"
    args = types.SimpleNamespace(model=start_checkpoint, data_dir=str(data), dataset=None)
    for out, message in [
        (Path(start_checkpoint, "run"), "is inside --model"),
        (data / "run", "is inside --data_dir"),
        (workdir / "data", "holds --data_dir"),
    ]:
        with pytest.raises(UserError, match=message):
            check_output_dir(str(out), True, False, inputs=args)
        assert not out.exists() or out == workdir / "data"
    other = types.SimpleNamespace(model="tiny", data_dir="data/synthetic", dataset=None)
    with pytest.raises(UserError, match=f"is inside the prepared data folder {data}"):
        check_output_dir(str(data / "run"), True, False, inputs=other)  # another run's data: --force would delete the run


def test_prepare_force_never_deletes_a_run_inside_the_data_folder(tmp_path):
    from hftrain.data import PrepareArguments, prepare

    out = prepare(PrepareArguments(output_dir=str(tmp_path / "data"), num_examples=100))
    (out / "run").mkdir()
    (out / "run/metrics.json").write_text("{}")
    with pytest.raises(UserError, match="holds run, which prepare_datasets.py did not write"):
        prepare(PrepareArguments(output_dir=str(out), num_examples=120, force=True))
    assert (out / "run/metrics.json").exists() and json.loads((out / "info.json").read_text())["num_train"] == 90


def test_overwrite_removes_only_the_checkpoints_runs_wrote(tmp_path, own_process_state):
    from hftrain.cli import check_output_dir

    out = tmp_path / "out"
    trainer_checkpoint(out / "checkpoint-4")
    (out / "checkpoint-best-model").mkdir()
    (out / "checkpoint-best-model/model.safetensors").write_text("the user's own")
    (out / "checkpoint-notes.txt").write_text("notes")
    (out / "metrics.json").write_text("{}")
    check_output_dir(str(out), True, False)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-best-model", "checkpoint-notes.txt", "metrics.json", "run.lock"]


def test_resume_removes_the_saves_a_kill_cut_short(tmp_path, own_process_state):
    """A kill during a save leaves a loop's checkpoint-<step>.tmp or a Trainer checkpoint without trainer_state.json;
    saving that step again would write into it and keep what the killed save left (a large temporary file)."""
    from hftrain.cli import check_output_dir

    out = tmp_path / "out"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2/loop_state.json").write_text("{}")
    (out / "checkpoint-4.tmp").mkdir()
    (out / "checkpoint-4.tmp/model.safetensors").write_bytes(bytes(1000))
    (out / "checkpoint-6").mkdir()
    (out / "checkpoint-6/model.safetensors").write_bytes(bytes(1000))
    check_output_dir(str(out), False, True)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "run.lock"]


# ---------------------------------------------------------------- what used to pass in silence


def test_a_source_file_changed_after_preparation_is_refused(tmp_path):
    from hftrain.data import PrepareArguments, prepare

    corpus = tmp_path / "my corpus.txt"
    corpus.write_text("A first document about cats.\n\nA second one about dogs.\n" * 30)
    out = prepare(PrepareArguments(dataset=str(corpus), output_dir=str(tmp_path / "data"), block_size=16))
    os.utime(corpus)  # touched, same content: still the data it was prepared from
    assert prepare(PrepareArguments(dataset=str(corpus), output_dir=str(out), block_size=16)) == out
    corpus.write_text(corpus.read_text() + "A third document.\n")
    rebuild = f"python scripts/prepare_datasets.py --dataset '{corpus}' --output_dir {out} --block_size 16 --force"
    with pytest.raises(UserError, match=f"--dataset {corpus} changed since it was prepared into {out} .*"):
        prepare(PrepareArguments(dataset=str(corpus), output_dir=str(out), block_size=16))
    with pytest.raises(UserError) as e:
        prepare(PrepareArguments(dataset=str(corpus), output_dir=str(out), block_size=16))
    assert str(e.value).endswith(f"rebuild it: {rebuild}")  # shell-quoted: the path has a space
    corpus.unlink()  # deleted once prepared: the prepared data stands on its own
    assert prepare(PrepareArguments(dataset=str(corpus), output_dir=str(out), block_size=16)) == out


def test_a_tokenizer_that_loses_characters_is_refused_or_named(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hftrain.data import PrepareArguments, prepare

    english = "the cat sat on the mat and the dog ran to the park "
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([english] * 10, trainers.WordPieceTrainer(vocab_size=100, special_tokens=["[UNK]", "</s>"]))
    folder = tmp_path / "ascii-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(folder)
    russian = tmp_path / "russian.txt"
    russian.write_text((english + "кошка сидела на коврике и собака бежала в парк\n\n") * 20)
    with pytest.raises(UserError, match=r"the tokenizer of .* loses \d+% of the characters of --dataset"):
        prepare(PrepareArguments(dataset=str(russian), output_dir=str(tmp_path / "ru"), tokenizer=str(folder), block_size=16))
    mostly = tmp_path / "mostly-english.txt"
    mostly.write_text((english * 10 + "café\n\n") * 20)
    prepare(PrepareArguments(dataset=str(mostly), output_dir=str(tmp_path / "en"), tokenizer=str(folder), block_size=16))
    # "café" is one unknown word: its 4 characters of each ~400 are lost
    assert f"warning: the tokenizer of {folder} loses 0.9% of the characters" in capsys.readouterr().out


def test_sft_refuses_a_batch_larger_than_its_data(workdir, tmp_path):
    proc = run_script(
        "trainer/sft.py",
        *["--num_examples", "100", "--per_device_train_batch_size", "1000", "--output_dir", str(tmp_path / "o")],
        cwd=workdir,
        check=False,
    )
    one_sentence(proc, "--per_device_train_batch_size 1000 is larger than the 90 training examples")


# ---------------------------------------------------------------- each failure named by its cause


def test_a_model_that_fails_after_its_config_loaded_names_the_cause(workdir, start_checkpoint, monkeypatch):
    from transformers import AutoModelForCausalLM

    from hftrain.data import load_prepared
    from hftrain.models import load_model

    def kernels_missing(*args, **kwargs):
        raise ValueError("Kernels are not available. To use kernels, please install kernels using `pip install kernels`")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", kernels_missing)
    with pytest.raises(UserError) as e:
        load_model(start_checkpoint, load_prepared(str(workdir / "data/synthetic")).tokenizer)
    assert "ValueError: Kernels are not available" in str(e.value) and "config.json" not in str(e.value)


def test_resume_into_another_model_is_one_sentence(workdir, tmp_path):
    from safetensors.torch import save_file

    from hftrain.checkpoints import check_same_model
    from hftrain.data import load_prepared
    from hftrain.models import load_model, preset_config

    tokenizer = load_prepared(str(workdir / "data/synthetic")).tokenizer
    model = load_model("tiny", tokenizer)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, checkpoint / "model.safetensors"
    )
    check_same_model(str(checkpoint), model)  # the same model: resumes
    config = preset_config("tiny", tokenizer)
    config.hidden_size, config.intermediate_size = 32, 128
    from transformers import AutoModelForCausalLM

    other = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match=f"--resume_from_checkpoint {checkpoint} was saved from another model"):
        check_same_model(str(checkpoint), other)


def test_a_full_disk_during_preparation_names_the_data_folder(tmp_path, monkeypatch):
    from datasets import DatasetDict

    from hftrain.data import PrepareArguments, prepare

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DatasetDict, "save_to_disk", disk_full)
    with pytest.raises(UserError, match=f"no space left in {tmp_path} while preparing the data folder {tmp_path / 'data'}"):
        prepare(PrepareArguments(output_dir=str(tmp_path / "data"), num_examples=100))
    assert os.listdir(tmp_path) == []


def test_sigterm_during_preparation_leaves_no_temporary_folder(tmp_path):
    """In a child process (SIGTERM would end this one): the signal arrives while the data is being written."""
    from datasets import DatasetDict

    from hftrain.data import PrepareArguments, prepare

    def terminated(*args, **kwargs) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    pid = os.fork()
    if pid == 0:
        status = 3
        try:
            DatasetDict.save_to_disk = terminated  # type: ignore[method-assign]
            prepare(PrepareArguments(output_dir=str(tmp_path / "data"), num_examples=100))
        except SystemExit as e:
            status = 1 if "stopped by SIGTERM" in str(e.code) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    assert os.listdir(tmp_path) == []
