"""Checkpoints that are directories (DeepSpeed, sharded FSDP, torch.distributed.checkpoint, Hugging Face),
and ``verify: load``."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ckpt_watcher import integrity
from ckpt_watcher.delete import Outcome, apply_plan
from ckpt_watcher.integrity import DIRECTORY_QUIET_SECONDS
from ckpt_watcher.overrides import PolicyTree
from ckpt_watcher.plan import Action, plan
from ckpt_watcher.policy import load_policy
from ckpt_watcher.protection import ProtectionRegistry
from ckpt_watcher.reconcile import Reconciler, Trigger
from ckpt_watcher.scan import ScanOptions, scan_tree
from ckpt_watcher.trash_moves import TrashTarget
from tests.support.cli import events, prune_entries, run_cli, run_python
from tests.support.factories import backdate_tree, directory_checkpoint, step_name, write_checkpoint
from tests.support.quiet_clock import QuietClock

pytestmark = pytest.mark.timeout(240)


def deepspeed_layout(path: Path, *, complete: bool = True) -> Path:
    """What Lightning's DeepSpeedStrategy leaves (DeepSpeed's save_checkpoint, tag "checkpoint"):
    per-rank model and ZeRO optimizer files, zero_to_fp32.py, and `latest`, written last by rank 0."""
    shards = {"mp_rank_00_model_states.pt": b"m" * 4096}
    shards.update({f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": b"o" * 4096 for rank in range(2)})
    directory_checkpoint(path, shards, complete=False)
    (path / "zero_to_fp32.py").write_text("# DeepSpeed's conversion script\n")
    if complete:
        (path / "latest").write_text("checkpoint")
    return path


def dcp_save(path: Path, *, lightning_meta: bool) -> None:
    """A real torch.distributed.checkpoint save on CPU; Lightning's sharded FSDP adds meta.pt last."""
    run_python(
        """
        import sys, warnings, torch
        import torch.distributed.checkpoint as dcp
        warnings.simplefilter("ignore")
        path = sys.argv[1]
        dcp.save({"model": {"w": torch.randn(64, 64), "b": torch.zeros(64)}}, checkpoint_id=path)
        if sys.argv[2] == "meta":
            torch.save({"epoch": 0, "global_step": 500, "optimizer_states": []}, path + "/meta.pt")
        """,
        str(path),
        "meta" if lightning_meta else "no-meta",
        check=True,
    )


def test_deepspeed_directories_complete_ones_pruned_incomplete_ones_kept(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(500, 3500, 500):
        backdate_tree(deepspeed_layout(root / step_name(0, step)))
    unfinished = deepspeed_layout(root / step_name(0, 3500), complete=False)  # `latest` not yet written
    backdate_tree(unfinished)
    fresh = deepspeed_layout(root / step_name(0, 4000))  # complete, but written just now
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries[step_name(0, 3500)]["action"] == "skip"
    assert "no completion marker" in entries[step_name(0, 3500)]["reasons"][0]
    assert entries[fresh.name]["action"] == "skip"
    assert "still being written" in entries[fresh.name]["reasons"][0]
    assert entries[step_name(0, 3000)]["type"] == "directory"
    assert entries[step_name(0, 3000)]["bytes"] > 3 * 4096
    kept = {name for name, entry in entries.items() if entry["action"] == "keep"}
    assert kept == {step_name(0, 2500), step_name(0, 3000)}

    assert run_cli("prune", str(root), "--policy", str(policy)).returncode == 0
    assert sorted(path.name for path in root.iterdir()) == sorted(
        [step_name(0, 2500), step_name(0, 3000), step_name(0, 3500), step_name(0, 4000)]
    )
    assert (unfinished / "checkpoint" / "mp_rank_00_model_states.pt").exists()


@pytest.mark.parametrize("how", ["a link in another run", "--protect"])
def test_a_file_inside_a_directory_checkpoint_named_from_elsewhere_keeps_it_whole(
    tmp_path: Path, how: str
) -> None:
    """A second stage starts from the first stage's weights inside a DeepSpeed checkpoint
    (``stage2/last.ckpt -> ../run/<step 500>/checkpoint/mp_rank_00_model_states.pt``, or the same
    file given to ``--protect``): that checkpoint is kept whole, never deleted around the file."""
    root = tmp_path / "root"
    for step in range(500, 3000, 500):
        backdate_tree(deepspeed_layout(root / "run" / step_name(0, step)))
    weights = root / "run" / step_name(0, 500) / "checkpoint" / "mp_rank_00_model_states.pt"
    protect: list[str] = []
    if how == "--protect":
        protect = ["--protect", str(weights)]
    else:
        (root / "stage2").mkdir()
        os.symlink(os.path.relpath(weights, root / "stage2"), root / "stage2" / "last.ckpt")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), *protect, "--dry-run", "--json"), exit_code=0
    )
    completed = run_cli("prune", str(root), "--policy", str(policy), *protect)

    held = entries[step_name(0, 500)]
    assert held["action"] == "keep"
    assert held["reasons"][0].startswith("holds checkpoint/mp_rank_00_model_states.pt: ")
    assert completed.returncode == 0, completed.stderr
    assert weights.exists()
    assert sorted(path.name for path in (root / "run").iterdir()) == [
        step_name(0, step) for step in (500, 2000, 2500)
    ]


def test_lightning_sharded_fsdp_needs_meta_pt(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (500, 1000, 1500):
        dcp_save(root / step_name(0, step), lightning_meta=True)
    dcp_save(root / step_name(0, 2000), lightning_meta=False)  # .metadata written, meta.pt not yet
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert "meta.pt, written last, is missing" in entries[step_name(0, 2000)]["reasons"][0]
    assert entries[step_name(0, 1500)]["action"] == "keep"
    assert entries[step_name(0, 1000)]["action"] == "delete"
    assert entries[step_name(0, 500)]["action"] == "delete"


def test_plain_dcp_directories_with_their_own_template(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in (100, 200, 300):
        dcp_save(root / f"dcp_step_{step}", lightning_meta=False)
    partial = root / "dcp_step_400"
    dcp_save(partial, lightning_meta=False)
    (partial / ".metadata").rename(partial / ".metadata.tmp")  # torch renames it into place last
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 2\nnaming:\n  step: 'dcp_step_{step}'\n")

    assert run_cli("prune", str(root), "--policy", str(policy)).returncode == 0

    assert sorted(path.name for path in root.iterdir()) == ["dcp_step_200", "dcp_step_300", "dcp_step_400"]


def test_hugging_face_checkpoint_directories(tmp_path: Path) -> None:
    root = tmp_path / "output"
    for step in (500, 1000, 1500, 2000):
        directory = root / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        for name in (
            "model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "training_args.bin",
        ):
            (directory / name).write_bytes(b"x" * 100)
        if step != 2000:  # the newest one has not written trainer_state.json (its last file) yet
            (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    backdate_tree(root)
    (root / "tmp-checkpoint-2500").mkdir()  # a staging directory is never a checkpoint
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )
    assert entries["checkpoint-2000"]["action"] == "skip"
    assert run_cli("prune", str(root), "--policy", str(policy)).returncode == 0

    assert sorted(path.name for path in root.iterdir()) == [
        "checkpoint-1500",
        "checkpoint-2000",
        "tmp-checkpoint-2500",
    ]


def test_symlink_planted_inside_a_directory_checkpoint_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    precious = write_checkpoint(outside / "precious.ckpt")
    (outside / "data").mkdir()
    write_checkpoint(outside / "data" / "shard.pt")
    root = tmp_path / "run"
    for step in (500, 1000):
        doomed = deepspeed_layout(root / step_name(0, step))
        os.symlink(precious, doomed / "checkpoint" / "link-to-file.pt")
        os.symlink(outside / "data", doomed / "checkpoint" / "link-to-directory")
    for step in (1500, 2000, 2500, 3000, 3500):
        deepspeed_layout(root / step_name(0, step))
    backdate_tree(root)

    completed = run_cli("prune", str(root))

    assert completed.returncode == 0, completed.stderr
    assert not (root / step_name(0, 500)).exists()
    assert precious.exists()
    assert (outside / "data" / "shard.pt").exists()
    assert not any(name.startswith(".ckpt-watcher-deleting") for name in os.listdir(root))


def test_last_symlink_to_a_directory_checkpoint_protects_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for step in range(500, 4000, 500):
        deepspeed_layout(root / step_name(0, step))
    os.symlink(step_name(0, 500), root / "last.ckpt")
    backdate_tree(root)

    entries = prune_entries(run_cli("prune", str(root), "--dry-run", "--json"), exit_code=0)

    assert entries[step_name(0, 500)]["action"] == "keep"
    assert entries[step_name(0, 500)]["reasons"] == ["target of last.ckpt"]


def _corrupt_pickle(path: Path) -> None:
    """Keep the archive valid but replace data.pkl with bytes that do not unpickle."""
    with zipfile.ZipFile(path) as source:
        items = [(info, source.read(info.filename)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as target:
        for info, data in items:
            target.writestr(info, b"\x80\x05not a pickle" if info.filename.endswith("data.pkl") else data)


def test_verify_load_skips_a_zip_valid_file_whose_pickle_is_corrupt(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    run_python(
        """
        import sys, torch
        for step in (500, 1000, 1500):
            torch.save({"state_dict": {"w": torch.zeros(8)}, "global_step": step},
                       f"{sys.argv[1]}/epoch=00-step={step:06d}-train.ckpt")
        """,
        str(root),
        check=True,
    )
    corrupt = root / step_name(0, 1500)
    _corrupt_pickle(corrupt)
    zip_policy = tmp_path / "zip.yaml"
    zip_policy.write_text("save_top_k_checkpoints: 1\nverify: zip\n")
    load_policy = tmp_path / "load.yaml"
    load_policy.write_text("save_top_k_checkpoints: 1\nverify: load\n")

    by_zip = prune_entries(
        run_cli("prune", str(root), "--policy", str(zip_policy), "--dry-run", "--json"), exit_code=0
    )
    by_load_run = run_cli("prune", str(root), "--policy", str(load_policy), "--json")
    by_load = prune_entries(by_load_run, exit_code=0)

    assert by_zip[corrupt.name]["action"] == "keep"  # the archive is whole; only loading finds out
    assert by_load[corrupt.name]["action"] == "skip"
    assert by_load[corrupt.name]["reasons"][0].startswith("corrupt: ")
    assert by_load[step_name(0, 1000)]["action"] == "keep"  # the corrupt newest pushes nothing out
    assert sorted(path.name for path in root.iterdir()) == [step_name(0, 1000), step_name(0, 1500)]
    assert "checkpoint_suspicious" in by_load_run.stderr


def test_verify_load_accepts_checkpoints_with_objects_the_safe_loader_refuses(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    run_python(
        """
        import argparse, sys, torch
        for step in (500, 1000):
            torch.save({"hyper_parameters": argparse.Namespace(lr=0.1), "global_step": step},
                       f"{sys.argv[1]}/epoch=00-step={step:06d}-train.ckpt")
        """,
        str(root),
        check=True,
    )
    policy = tmp_path / "load.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nverify: load\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries[step_name(0, 1000)]["action"] == "keep"
    assert entries[step_name(0, 500)]["action"] == "delete"


def hugging_face_checkpoint(directory: Path, step: int, best: str | None = None) -> Path:
    """A Hugging Face Trainer ``checkpoint-N/``: its files, then ``trainer_state.json``, written last
    (naming ``best`` as its ``best_model_checkpoint``, as the Trainer writes it: a path)."""
    directory.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (directory / name).write_bytes(b"x" * 100)
    state = {"global_step": step, "best_model_checkpoint": best and f"/trainer/mount/output/{best}"}
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return directory


def test_hugging_face_checkpoint_saved_again_in_place_and_killed_pushes_no_older_one_out(
    tmp_path: Path,
) -> None:
    # A run rolled back to checkpoint-500 saves checkpoint-1000 again, into the same directory (as the
    # Trainer does), and is killed while optimizer.pt is half rewritten: the old trainer_state.json
    # is still there, older than the file written after it.
    root = tmp_path / "output"
    hugging_face_checkpoint(root / "checkpoint-500", 500)
    resaved = hugging_face_checkpoint(root / "checkpoint-1000", 1000)
    backdate_tree(root)
    (resaved / "optimizer.pt").write_bytes(b"x" * 10)
    backdate_tree(resaved / "optimizer.pt", seconds=600)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries["checkpoint-1000"]["action"] == "skip"
    assert "newer than trainer_state.json" in entries["checkpoint-1000"]["reasons"][0]
    assert entries["checkpoint-500"]["action"] == "keep"


def test_hugging_face_checkpoint_with_a_truncated_trainer_state_pushes_no_older_one_out(
    tmp_path: Path,
) -> None:
    # Killed while writing trainer_state.json (opened with "w", then written): it is there, but cut.
    root = tmp_path / "output"
    hugging_face_checkpoint(root / "checkpoint-500", 500)
    killed = hugging_face_checkpoint(root / "checkpoint-1000", 1000)
    whole = (killed / "trainer_state.json").read_bytes()
    (killed / "trainer_state.json").write_bytes(whole[: len(whole) // 2])
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries["checkpoint-1000"]["action"] == "skip"
    assert "not whole JSON" in entries["checkpoint-1000"]["reasons"][0]
    assert entries["checkpoint-500"]["action"] == "keep"


@pytest.mark.parametrize("lightning_meta", [False, True], ids=["dcp", "lightning-fsdp"])
def test_sharded_checkpoint_saved_again_in_place_and_killed_pushes_no_older_one_out(
    tmp_path: Path, lightning_meta: bool
) -> None:
    # torch.distributed.checkpoint overwrites by default: saved again into the same directory and
    # killed while its data file is rewritten, the old .metadata (and meta.pt) stand over a cut file.
    root = tmp_path / "run"
    suffix = ".ckpt" if lightning_meta else ""
    for step in (100, 200):
        dcp_save(root / f"dcp_step_{step}{suffix}", lightning_meta=lightning_meta)
    backdate_tree(root)
    resaved = root / f"dcp_step_200{suffix}"
    data = next(path for path in resaved.iterdir() if path.name.endswith(".distcp"))
    data.write_bytes(data.read_bytes()[:100])
    backdate_tree(data, seconds=600)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'dcp_step_{step}'\n")

    result = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json")
    entries = prune_entries(result, exit_code=0)

    assert entries[resaved.name]["action"] == "skip"
    assert entries[f"dcp_step_100{suffix}"]["action"] == "keep"
    # it may stay so for good (nothing finishes it), holding the run's retention: warned, once
    marker = "meta.pt" if lightning_meta else ".metadata"
    warnings = events(result.stderr, "checkpoint_suspicious")
    assert [(record["path"], record["detail"]) for record in warnings] == [
        (
            str(resaved),
            f"a file in it is newer than {marker}, which its writer writes last: saved again in place "
            "and not finished; kept",
        )
    ]


def test_the_checkpoint_hugging_face_calls_the_best_is_kept(tmp_path: Path) -> None:
    # load_best_model_at_end loads what the newest trainer_state.json names (the Trainer's own
    # rotation never deletes it); an older checkpoint's older best is not kept for that.
    root = tmp_path / "output"
    hugging_face_checkpoint(root / "checkpoint-500", 500)
    hugging_face_checkpoint(root / "checkpoint-1000", 1000, best="checkpoint-500")
    hugging_face_checkpoint(root / "checkpoint-1500", 1500, best="checkpoint-1000")
    hugging_face_checkpoint(root / "checkpoint-2000", 2000, best="checkpoint-1000")
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries["checkpoint-1000"]["action"] == "keep"
    assert entries["checkpoint-1000"]["reasons"] == [
        "best_model_checkpoint in checkpoint-2000/trainer_state.json (Hugging Face)"
    ]
    assert entries["checkpoint-2000"]["action"] == "keep"
    assert entries["checkpoint-500"]["action"] == "delete"
    assert entries["checkpoint-1500"]["action"] == "delete"


def test_after_a_resume_from_an_older_checkpoint_the_live_runs_best_is_kept_too(tmp_path: Path) -> None:
    # A run that reached checkpoint-3000 crashed and resumed from checkpoint-1000 (other data, other
    # learning rate): the abandoned checkpoint-3000 stays until the live run passes 3000, so the
    # highest step names the abandoned branch's best; the checkpoint written last names the live one's.
    root = tmp_path / "output"
    hugging_face_checkpoint(root / "checkpoint-500", 500)
    hugging_face_checkpoint(root / "checkpoint-1000", 1000, best="checkpoint-500")
    hugging_face_checkpoint(root / "checkpoint-3000", 3000, best="checkpoint-500")
    backdate_tree(root, seconds=7200)  # the abandoned branch, older
    hugging_face_checkpoint(root / "checkpoint-1500", 1500, best="checkpoint-1500")
    hugging_face_checkpoint(root / "checkpoint-2000", 2000, best="checkpoint-1500")
    backdate_tree(root / "checkpoint-1500", seconds=3700)
    backdate_tree(root / "checkpoint-2000")
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries["checkpoint-1500"]["action"] == "keep"
    assert entries["checkpoint-1500"]["reasons"] == [
        "best_model_checkpoint in checkpoint-2000/trainer_state.json (Hugging Face)"
    ]
    assert entries["checkpoint-500"]["reasons"] == [
        "best_model_checkpoint in checkpoint-3000/trainer_state.json (Hugging Face)"
    ]
    assert entries["checkpoint-3000"]["action"] == "keep"  # the newest step checkpoint
    assert entries["checkpoint-1000"]["action"] == "delete"


def _daemon_core(root: Path, tmp_path: Path, policy_text: str) -> Reconciler:
    """The daemon's reconcile core for ``root`` (long-lived: it keeps what it saw across passes)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text)
    return Reconciler(
        PolicyTree(root, load_policy(policy), strict=False),
        ProtectionRegistry(root),
        pins={},
        settle_seconds=0,
        one_shot=False,
    )


def _kept(core: Reconciler, trigger: Trigger) -> dict[str, tuple[str, ...]]:
    """What a (dry-run) pass of ``core`` keeps, and why."""
    result = core.run(trigger, dry_run=True, keep_plan=True)
    assert result.group_plans is not None
    return {
        decision.record.name: decision.reasons
        for plan in result.group_plans
        for decision in plan.decisions
        if decision.action is Action.KEEP
    }


def test_the_daemon_reads_a_trainer_state_once_per_version_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quiet_clock: QuietClock
) -> None:
    # A long run's trainer_state.json is tens of MB (seconds to parse): a daemon reads each one once,
    # not at every pass; saved again (same size, its mtime put back), it is read again and its new
    # best kept; a checkpoint removed leaves the daemon's memory.
    root = tmp_path / "output"
    for step in (1000, 2000, 3000):
        hugging_face_checkpoint(root / f"checkpoint-{step}", step, best="checkpoint-1000")
    backdate_tree(root)
    core = _daemon_core(root, tmp_path, "save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")
    reads: list[int] = []
    real_read = integrity._read_up_to

    def counted_read(file_descriptor: int, size: int) -> bytes:
        reads.append(size)
        return real_read(file_descriptor, size)

    monkeypatch.setattr(integrity, "_read_up_to", counted_read)
    newest_state = root / "checkpoint-3000" / "trainer_state.json"
    while time.time() < os.stat(newest_state).st_ctime_ns / 1e9 + 2.5:  # past the racy window
        time.sleep(0.1)
    best = "best_model_checkpoint in checkpoint-3000/trainer_state.json (Hugging Face)"

    _kept(core, Trigger.STARTUP)  # each seen once: counted once seen unchanged for the quiet time
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS)
    for trigger in (Trigger.RESCAN, Trigger.RESCAN, Trigger.RESCAN):
        kept = _kept(core, trigger)
        assert sorted(kept) == ["checkpoint-1000", "checkpoint-3000"]
        assert kept["checkpoint-1000"] == (best,)
    assert len(reads) == 3  # each once, at the first pass

    before = os.stat(newest_state)
    newest_state.write_text(newest_state.read_text().replace("checkpoint-1000", "checkpoint-2000"))
    while os.stat(newest_state).st_ctime_ns == before.st_ctime_ns:  # (a coarse clock's same tick)
        time.sleep(0.01)
        newest_state.write_bytes(newest_state.read_bytes())
    os.utime(newest_state, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(newest_state).st_size == before.st_size

    kept = _kept(core, Trigger.RESCAN)
    assert sorted(kept) == ["checkpoint-2000", "checkpoint-3000"]
    assert kept["checkpoint-2000"] == (best,)
    assert len(reads) == 4

    known = core.index.state(root).cache.trainer_states()
    assert len(known) == 3
    (root / "checkpoint-1000").rename(tmp_path / "moved-away")
    _kept(core, Trigger.RESCAN)
    assert len(known) == 2
    assert "checkpoint-1000" not in known


def test_the_best_of_a_hugging_face_run_saved_with_deepspeed_is_kept(tmp_path: Path) -> None:
    # The Trainer with DeepSpeed: each checkpoint-N/ holds DeepSpeed's files and `latest` beside
    # trainer_state.json; the best it names is kept all the same.
    root = tmp_path / "output"
    for step, best in ((500, None), (1000, "checkpoint-500"), (1500, "checkpoint-500")):
        directory = hugging_face_checkpoint(root / f"checkpoint-{step}", step, best=best)
        deepspeed_layout(directory / f"global_step{step}", complete=False)
        (directory / "latest").write_text(f"global_step{step}")
        (directory / "trainer_state.json").touch()  # written after `latest`, as the Trainer does
    backdate_tree(root)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{step}'\n")

    entries = prune_entries(
        run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json"), exit_code=0
    )

    assert entries["checkpoint-500"]["action"] == "keep"
    assert entries["checkpoint-500"]["reasons"] == [
        "best_model_checkpoint in checkpoint-1500/trainer_state.json (Hugging Face)"
    ]
    assert entries["checkpoint-1000"]["action"] == "delete"


def test_a_directory_checkpoint_with_no_marker_it_knows_is_kept_and_warned_about_once_quiet(
    tmp_path: Path,
) -> None:
    # Accelerate's save_state (automatic_checkpoint_naming) writes checkpoints/checkpoint_N/ with no
    # marker of its own: never counted, so never deleted, and warned about once it has been quiet
    # (retention of that run stops there); one still being written is not warned about.
    root = tmp_path / "checkpoints"
    for step in (0, 1, 2):
        directory = root / f"checkpoint_{step}"
        directory.mkdir(parents=True)
        for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            (directory / name).write_bytes(b"x" * 100)
    backdate_tree(root)
    fresh = root / "checkpoint_3"
    fresh.mkdir()
    (fresh / "model.safetensors").write_bytes(b"x" * 100)
    policy = tmp_path / "policy.yaml"
    policy.write_text("save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint_{step}'\n")

    result = run_cli("prune", str(root), "--policy", str(policy), "--dry-run", "--json")
    entries = prune_entries(result, exit_code=0)

    assert {entry["action"] for entry in entries.values()} == {"skip"}
    warned = sorted(record["path"] for record in events(result.stderr, "checkpoint_suspicious"))
    assert warned == [str(root / f"checkpoint_{step}") for step in (0, 1, 2)]
    assert all(
        "no completion marker yet" in record["detail"]
        for record in events(result.stderr, "checkpoint_suspicious")
    )


def test_ranks_whose_clock_is_behind_never_make_a_checkpoint_still_written_push_the_whole_one_out(
    tmp_path: Path, quiet_clock: QuietClock
) -> None:
    """DeepSpeed ranks on hosts whose clock is 10 minutes behind (NFS, Lustre) write the next
    checkpoint: its files are dated long past, so by their times it was quiet at once, it counted, and
    the daemon deleted the only whole checkpoint while ranks were still writing. The daemon counts a
    directory checkpoint only once its own clock has seen it unchanged for the quiet time; each write
    into it starts that again."""
    run = tmp_path / "run"
    older = backdate_tree(directory_checkpoint(run / step_name(1, 1000)), 7200)
    newer = directory_checkpoint(run / step_name(1, 2000), {"mp_rank_00_model_states.pt": b"rank 0"})
    backdate_tree(newer, 600)
    core = _daemon_core(run, tmp_path, "save_top_k_checkpoints: 1\n")

    deleted = [core.run(Trigger.STARTUP).deleted]
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    write_checkpoint(newer / "checkpoint" / "mp_rank_01_model_states.pt", b"rank 1")  # still written
    backdate_tree(newer, 600)
    deleted.append(core.run(Trigger.RESCAN).deleted)
    kept_while_written = older.exists()
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    result = core.run(Trigger.RESCAN, dry_run=True, keep_plan=True)
    assert result.group_plans is not None
    waiting = [
        decision.reasons
        for plan in result.group_plans
        for decision in plan.decisions
        if decision.record.name == newer.name and decision.action is Action.SKIP
    ]
    quiet_clock.pass_quiet_time(DIRECTORY_QUIET_SECONDS / 2)
    deleted.append(core.run(Trigger.RESCAN).deleted)

    assert deleted == [0, 0, 1]
    assert kept_while_written
    assert len(waiting) == 1
    assert any("by this watcher's clock" in reason for reason in waiting[0]), waiting
    assert sorted(path.name for path in run.iterdir() if not path.name.startswith(".")) == [newer.name]


def _rewrite_in_place(checkpoint: Path, how: str) -> None:
    """What a save into an existing directory checkpoint does to it, leaving the directory's own mtime
    as it was (no entry of its own made or removed)."""
    if how == "a file rewritten, same size":
        with (checkpoint / "optimizer.pt").open("r+b") as handle:
            handle.write(b"z" * 100)
    elif how == "a file rewritten, longer":
        (checkpoint / "model.safetensors").write_bytes(b"z" * 4096)
    else:
        (checkpoint / "shards" / "part-1").write_bytes(b"z" * 100)


@pytest.mark.parametrize("grace", [0, 3600], ids=["deleted", "trashed"])
@pytest.mark.parametrize(
    "how", ["a file rewritten, same size", "a file rewritten, longer", "a file added below"]
)
def test_a_directory_checkpoint_written_to_after_its_plan_is_kept(
    tmp_path: Path, how: str, grace: int
) -> None:
    """A review found a directory checkpoint saved again in place after its group's scan (a rolled-back
    run reaching the same step: torch.distributed.checkpoint overwrites by default, Hugging Face's
    ``save_file`` opens with ``"wb"``) deleted, or trashed, mid-save: the deletion's walk compared only
    the directory's own inode and mtime, which rewriting a file in it, or making one in a directory
    below, leaves as they were. The walk's signature (entries, bytes, times) is now held to the scan's:
    kept (CHANGED), and deleted by a later pass once its save is over and it is still planned."""
    root = tmp_path / "output"
    older = hugging_face_checkpoint(root / "checkpoint-100", 100)
    (older / "shards").mkdir()
    (older / "shards" / "part-0").write_bytes(b"y" * 100)
    hugging_face_checkpoint(root / "checkpoint-200", 200)
    backdate_tree(root)
    policy_file = tmp_path / "policy.yaml"
    trash = f"trash:\n  grace: {grace}s\n" if grace else ""
    policy_file.write_text(f"save_top_k_checkpoints: 1\nnaming:\n  step: 'checkpoint-{{step}}'\n{trash}")
    policy = load_policy(policy_file).policy
    options = ScanOptions(directory_quiet_seconds=0.0)
    planned = plan(scan_tree(root, policy.compiled_naming, options).records, policy)
    assert [decision.record.name for decision in planned.deletions] == ["checkpoint-100"]
    _rewrite_in_place(older, how)
    target = TrashTarget(root, grace) if grace else None

    with capture_logs() as logs:
        results = apply_plan(planned, root, trash=target).results

    assert [result.outcome for result in results] == [Outcome.CHANGED]
    assert (older / "trainer_state.json").is_file()
    changed = [record for record in logs if record["event"] == "checkpoint_changed"]
    assert "written to since it was planned" in changed[0]["detail"]
    assert not (root / ".ckpt-trash").exists()  # (nothing moved, not even begun)
    state = older / "trainer_state.json"
    state.write_text(state.read_text())  # (the save ends: its marker written last)
    backdate_tree(root)
    again = plan(scan_tree(root, policy.compiled_naming, options).records, policy)
    outcomes = [result.outcome for result in apply_plan(again, root, trash=target).results]
    assert outcomes == [Outcome.TRASHED if grace else Outcome.DELETED]
    assert not older.exists()
