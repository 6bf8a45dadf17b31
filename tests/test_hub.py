"""Hub side of trajectories: model card, output-folder artifacts, push/pull through a loopback Hub, failed
uploads, and the ``hf-ddlr`` CLI.

Push/pull run in subprocesses whose environment points ``HF_ENDPOINT`` at the ``hub_server`` fixture
(huggingface_hub reads it at import) with a fresh ``HF_HOME`` (an empty cache), using the real client.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from test_trajectory import make_trajectory

from hf_ddlr import cli
from hf_ddlr.hub import (
    CARD_TAGS,
    HubUploadError,
    render_model_card,
    upload_folder_with_retry_message,
    write_artifacts,
)
from hf_ddlr.trajectory import TRAJECTORY_CONFIG_NAME, TRAJECTORY_TENSORS_NAME, LRTrajectory

PLOTS = [f"lr_trajectory_{k}.png" for k in ("class", "instance", "weight_decay", "meta_loss")]
TRAINER_CARD = textwrap.dedent(
    """\
    ---
    library_name: transformers
    license: apache-2.0
    tags:
    - generated_from_trainer
    model-index:
    - name: tiny-cnn
      results: []
    ---

    # tiny-cnn

    This model was trained from scratch on the toy dataset.

    ### Training hyperparameters

    - learning_rate: 0.1
    """
)


def run_client(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter (so HF_ENDPOINT / HF_HOME take effect at import)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"client failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc


def test_card_section_appended_to_trainer_card_keeps_metadata_and_is_idempotent():
    traj = make_trajectory()
    text = render_model_card(traj, model_name="tiny-cnn", base_card_text=TRAINER_CARD, plots=PLOTS,
                             repo_id="me/tiny-cnn", extra={"final eval accuracy": 0.91})
    card = ModelCard(text)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.to_dict()["model-index"] == [{"name": "tiny-cnn", "results": []}]
    assert card.data.tags == ["generated_from_trainer", *CARD_TAGS]
    assert "### Training hyperparameters" in card.text  # the Trainer's text stays
    for name in (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, *PLOTS):
        assert f"`{name}`" in card.text
    for name in PLOTS:
        assert f"]({name})" in card.text  # relative image links
    assert 'LRTrajectory.from_pretrained("me/tiny-cnn")' in card.text
    assert 'replay_trajectory="me/tiny-cnn"' in card.text
    assert "| `meta_lr` | 0.1 |" in card.text and "| final eval accuracy | 0.91 |" in card.text
    assert "| AUROC of final instance rate, clean vs noisy | 1 |" in card.text
    again = render_model_card(traj, model_name="tiny-cnn", base_card_text=text, plots=PLOTS, repo_id="me/tiny-cnn")
    assert again.count("## Learned learning-rate trajectory") == 1
    assert ModelCard(again).data.tags == card.data.tags


def test_write_artifacts_standalone_card(tmp_path):
    traj = make_trajectory()
    written = write_artifacts(traj, tmp_path, repo_id="me/traj")
    assert sorted(Path(p).name for p in written) == sorted(
        [TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, *PLOTS, "README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags == list(CARD_TAGS)
    assert card.text.lstrip().startswith("# me/traj")  # the repo, not the base model the run started from
    assert "This model was trained with data-dependent dynamic learning rates" in card.text
    assert LRTrajectory.from_pretrained(tmp_path) == traj
    # a later run of another rate level into the same folder: no stale plot of the earlier one remains
    instance_only = make_trajectory()
    instance_only._class = []
    written = write_artifacts(instance_only, tmp_path, repo_id="me/traj")
    assert not (tmp_path / "lr_trajectory_class.png").exists()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(Path(p).name for p in written if p.endswith(".png"))


def test_push_and_pull_through_the_hub(hub_server, tmp_path):
    traj = make_trajectory()
    traj_dir, model_dir = tmp_path / "traj", tmp_path / "model_out"
    traj.save_pretrained(traj_dir)
    # a Trainer output folder: fake weights + config + the Trainer's card, then our artifacts
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"\0fake weights\0" * 100)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "toy"}))
    (model_dir / "README.md").write_text(TRAINER_CARD)
    write_artifacts(traj, model_dir, model_name="tiny-cnn", repo_id="hubtest/tiny-cnn")

    hub_server.commit_files("model", "hubtest/plain-model", {"config.json": b"{}"})
    push_env = hub_server.client_env(tmp_path / "home_push")
    run_client(f"""
        from hf_ddlr.hub import upload_folder_with_retry_message
        from hf_ddlr.trajectory import LRTrajectory
        traj = LRTrajectory.from_pretrained({str(traj_dir)!r})
        traj.push_to_hub("hubtest/traj", commit_message="traj")
        traj.truncate(4)  # a different trajectory on a branch: revision= must select it
        traj.push_to_hub("hubtest/traj", revision="exp1")
        upload_folder_with_retry_message({str(model_dir)!r}, "hubtest/tiny-cnn", ignore_patterns=["_*"])
    """, push_env, tmp_path)

    pull_home, out = tmp_path / "home_pull", tmp_path / "pulled"
    assert not pull_home.exists()  # a clean cache: everything below comes over HTTP
    pulled = run_client(f"""
        from huggingface_hub import snapshot_download
        from hf_ddlr import cli
        from hf_ddlr.trajectory import LRTrajectory
        LRTrajectory.from_pretrained("hubtest/traj").save_pretrained({str(out / "traj")!r})
        LRTrajectory.from_pretrained("hubtest/tiny-cnn").save_pretrained({str(out / "model_traj")!r})
        LRTrajectory.from_pretrained("hubtest/traj", revision="exp1").save_pretrained({str(out / "exp1")!r})
        assert cli.main(["show", "hubtest/traj", "--plots-dir", {str(out / "cli_plots")!r}]) == 0
        try:  # a model repo without a trajectory: the error names the repo and the missing file
            LRTrajectory.from_pretrained("hubtest/plain-model")
        except FileNotFoundError as err:
            print("ERROR:", err)
        print(snapshot_download("hubtest/traj"))
        print(snapshot_download("hubtest/tiny-cnn"))
    """, hub_server.client_env(pull_home), tmp_path)
    assert (pull_home / "hub").is_dir()
    assert LRTrajectory.from_pretrained(out / "traj") == traj
    assert LRTrajectory.from_pretrained(out / "model_traj") == traj
    on_branch = LRTrajectory.from_pretrained(out / "exp1")
    traj.truncate(4)
    assert on_branch == traj and on_branch.num_steps == 4
    assert sorted(p.name for p in (out / "cli_plots").iterdir()) == sorted(PLOTS)

    assert "ERROR: Hub repo 'hubtest/plain-model' (revision main) has no lr_trajectory" in pulled.stdout
    snap_traj, snap_model = (Path(line) for line in pulled.stdout.strip().splitlines()[-2:])
    expected = {TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, "README.md", *PLOTS}
    assert expected <= {p.name for p in snap_traj.iterdir()}
    assert expected | {"model.safetensors", "config.json"} <= {p.name for p in snap_model.iterdir()}
    for name in PLOTS:  # the plots arrive intact (PNG bytes identical to the local folder's)
        assert (snap_model / name).read_bytes() == (model_dir / name).read_bytes()
        assert (snap_model / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(snap_model / "README.md")
    assert card.data.library_name == "transformers"
    assert set(CARD_TAGS) <= set(card.data.tags)
    for name in (TRAJECTORY_TENSORS_NAME, TRAJECTORY_CONFIG_NAME, *PLOTS):
        assert f"`{name}`" in card.text
    traj_card = ModelCard.load(snap_traj / "README.md")
    assert 'LRTrajectory.from_pretrained("hubtest/traj")' in traj_card.text


class _Always500(http.server.BaseHTTPRequestHandler):
    def _fail(self):
        body = b'{"error": "internal error"}'
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = _fail  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("failure", ["server_stopped", "http_500"])
def test_failed_upload_keeps_folder_and_says_how_to_retry(hub_server, tmp_path, monkeypatch, offline_off, failure):
    if failure == "server_stopped":
        endpoint = hub_server.endpoint
        hub_server.stop()
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Always500)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(offline_off, "ENDPOINT", endpoint)  # HfApi() reads it when constructed

    out = tmp_path / "output_dir"
    written = write_artifacts(make_trajectory(), out, repo_id="hubtest/fails")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(HubUploadError) as info:
        upload_folder_with_retry_message(out, "hubtest/fails", retry_hint="`trainer.push_to_hub()`")
    msg = str(info.value)
    assert msg.startswith(f"Upload of {out} to hubtest/fails failed: ")
    assert "The folder is complete locally; retry with " in msg
    assert f"`hf upload hubtest/fails {out} .`" in msg and "`trainer.push_to_hub()`" in msg
    assert ("500" in msg) if failure == "http_500" else ("Connect" in msg or "connect" in msg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched and complete
    assert len(before) == len(written)
    if failure == "http_500":
        server.shutdown()
        server.server_close()


def test_trajectory_push_failure_keeps_temporary_folder(hub_server, tmp_path, monkeypatch, offline_off):
    endpoint = hub_server.endpoint
    hub_server.stop()
    monkeypatch.setattr(offline_off, "ENDPOINT", endpoint)
    traj = make_trajectory()
    with pytest.raises(HubUploadError, match=r"retry with `hf upload hubtest/t .*` or `trajectory.push_to_hub") as info:
        traj.push_to_hub("hubtest/t")
    folder = Path(info.value.folder_path)
    try:
        assert LRTrajectory.from_pretrained(folder) == traj
        assert (folder / "README.md").is_file() and all((folder / p).is_file() for p in PLOTS)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_cli_version_names_hf_ddlr_and_the_installed_libraries(capsys):
    from importlib import metadata

    import hf_ddlr

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith(f"hf-ddlr {hf_ddlr.__version__} (torch {metadata.version('torch')}, ")
    assert f"transformers {metadata.version('transformers')}" in out and "huggingface_hub " in out


def test_cli_show_prints_summary_and_writes_plots(tmp_path, capsys):
    traj = make_trajectory()
    traj.save_pretrained(tmp_path / "run")
    assert cli.main(["show", str(tmp_path / "run"), "--plots-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| AUROC of final instance rate, clean vs noisy | 1 |" in out
    assert "| optimizer steps | 12 |" in out and "dataset: toy (split train, 12 examples)" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(PLOTS)
    assert cli.main(["show", str(tmp_path / "run"), "--json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["auroc_clean_vs_noisy"] == 1.0
    assert cli.main(["show", str(tmp_path / "nowhere")]) == 1
    assert "neither an existing local folder nor a Hub repo id" in capsys.readouterr().err
    # an example's output folder (a run per method): the error names the subfolder that holds the trajectory
    traj.save_pretrained(tmp_path / "example_out" / "metalr")
    assert cli.main(["show", str(tmp_path / "example_out"), "--no-plots"]) == 1
    assert "trajectories in its subfolder metalr (e.g. an example's output folder" in capsys.readouterr().err
    # --revision names a Hub revision: on a local folder it is said to be unused
    assert cli.main(["show", str(tmp_path / "run"), "--revision", "v1", "--no-plots"]) == 0
    assert "is a local folder; --revision v1 applies to Hub repos only" in capsys.readouterr().err


def test_cli_average_and_console_script(tmp_path):
    for f in range(2):
        make_trajectory(seed=f).save_pretrained(tmp_path / f"fold{f}")
    assert cli.main(["average", str(tmp_path / "avg"), str(tmp_path / "fold0"), str(tmp_path / "fold1")]) == 0
    avg = LRTrajectory.from_pretrained(tmp_path / "avg")
    assert avg.config["averaged_over_runs"] == 2
    script = Path(sys.executable).with_name("hf-ddlr")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "hf_ddlr.cli"]
    proc = subprocess.run([*cmd, "show", str(tmp_path / "avg"), "--plots-dir", str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "final instance rate: mean" in proc.stdout
    assert (tmp_path / "p" / "lr_trajectory_instance.png").is_file()
    # `| head`: the reader stops early; a closed pipe is the end of the output, not an error
    piped = subprocess.run(f"{' '.join(cmd)} show {tmp_path / 'avg'} --no-plots | head -1", shell=True,
                           capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stdout.startswith("# Learned LR trajectory") and "error" not in piped.stderr


def test_cli_average_refuses_to_write_over_a_run(tmp_path, capsys):
    """A forgotten OUT_DIR makes the first run the output: refused, as is a folder holding a trajectory already
    (unless --overwrite), so that no run's trajectory is replaced by an average beside its model."""
    for f in range(2):
        make_trajectory(seed=f).save_pretrained(tmp_path / f"run{f}")
    before = LRTrajectory.from_pretrained(tmp_path / "run0")
    assert cli.main(["average", str(tmp_path / "run0"), str(tmp_path / "run1")]) == 1
    assert "already holds a trajectory" in capsys.readouterr().err
    assert cli.main(["average", str(tmp_path / "run0"), str(tmp_path / "run0"), str(tmp_path / "run1")]) == 1
    assert "is one of the runs to average" in capsys.readouterr().err
    assert LRTrajectory.from_pretrained(tmp_path / "run0") == before
    assert cli.main(["average", str(tmp_path / "avg"), str(tmp_path / "run1")]) == 0
    assert "one run given" in capsys.readouterr().err
    assert cli.main(["average", str(tmp_path / "avg"), str(tmp_path / "run0"), str(tmp_path / "run1")]) == 1
    assert cli.main(["average", str(tmp_path / "avg"), str(tmp_path / "run0"), str(tmp_path / "run1"),
                     "--overwrite"]) == 0
    assert LRTrajectory.from_pretrained(tmp_path / "avg").config["averaged_over_runs"] == 2


def test_a_trajectory_pushed_into_a_model_repo_keeps_its_card_and_bad_ids_are_named(hub_server, tmp_path):
    """``push_to_hub`` (and ``hf-ddlr push``) into a repo that already has a model card adds the trajectory's
    section to it (it replaced the card); pushed again, the section is replaced, not repeated. A private push into
    an existing public repo, and an invalid repo id, are refused before anything is uploaded. Reading a repo or
    revision that does not exist names it instead of the Hub client's raw 404."""
    hub_server.commit_files("model", "hubtest/has-card", {"README.md": TRAINER_CARD.encode(), "config.json": b"{}"})
    make_trajectory().save_pretrained(tmp_path / "traj")
    tmpdir = tmp_path / "client_tmp"  # the client's temporary folders
    tmpdir.mkdir()
    out = run_client(f"""
        from huggingface_hub import hf_hub_download
        from hf_ddlr.trajectory import LRTrajectory
        traj = LRTrajectory.from_pretrained({str(tmp_path / "traj")!r})
        traj.push_to_hub("hubtest/has-card")
        traj.push_to_hub("hubtest/has-card")
        print("CARD<<" + open(hf_hub_download("hubtest/has-card", "README.md")).read() + ">>CARD")
        from huggingface_hub import HfApi
        for repo in ("hubtest/has-card", "bad id!!"):  # a public repo asked private; an invalid id
            try:
                traj.push_to_hub(repo, private=True)
            except ValueError as err:
                print("REFUSED:", err)
        traj.push_to_hub("hubtest/new-private", private=True)
        print("PRIVATE:", HfApi().repo_info("hubtest/new-private").private)
        for repo, rev in (("hubtest/no-such-repo", None), ("hubtest/has-card", "no-such-branch")):
            try:
                LRTrajectory.from_pretrained(repo, revision=rev)
            except FileNotFoundError as err:
                print("ERROR:", err)
    """, {**hub_server.client_env(tmp_path / "home"), "TMPDIR": str(tmpdir)}, tmp_path)
    assert not list(tmpdir.iterdir())  # the refused push left no temporary folder behind
    from hf_ddlr.trajectory.card import SECTION_END, SECTION_START

    card = out.stdout.split("CARD<<", 1)[1].split(">>CARD", 1)[0]
    assert "library_name: transformers" in card and "# tiny-cnn" in card  # the model's card is kept
    assert card.count(SECTION_START) == 1 and card.count(SECTION_END) == 1  # one section, after two pushes
    assert f"`{TRAJECTORY_TENSORS_NAME}`" in card
    assert "'hubtest/no-such-repo' is neither a local folder nor a Hub model repo this account can read" in out.stdout
    assert "Hub repo 'hubtest/has-card' has no revision 'no-such-branch'" in out.stdout
    assert "REFUSED: hubtest/has-card exists and is public, and private=True (--private) does not change" in out.stdout
    assert "REFUSED: 'bad id!!' is not a Hub repo id" in out.stdout
    assert "PRIVATE: True" in out.stdout
    assert card.count(SECTION_START) == 1  # (the refused private push changed nothing)
