"""hadaconv.atomic: outputs appear whole or not at all, with the permissions of any other file."""

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from hadaconv import atomic
from hadaconv.atomic import atomic_file, atomic_folder
from hadaconv.errors import OutputError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _readable_tree(root) -> dict[str, int]:
    """Mode of every path under root that is not group/other readable."""
    bad = {}
    for path in root.rglob("*"):
        mode = _mode(path)
        need = 0o055 if path.is_dir() else 0o044
        if mode & need != need:
            bad[str(path.relative_to(root))] = oct(mode)
    return bad


def test_folder_and_file_modes_follow_umask(tmp_path, umask_022):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "a.txt") == 0o644
    assert _mode(tmp_path / "f.json") == 0o644 and (tmp_path / "f.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]
    os.umask(0o077)  # a stricter umask is honoured too
    with atomic_file(tmp_path / "g") as tmp:
        tmp.write_text("x")
    assert _mode(tmp_path / "g") == 0o600


def test_failure_inside_block_leaves_old_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert (tmp_path / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "out"]


def test_failed_final_rename_restores_previous_folder(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # the new folder's rename into place
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary, no aside copy


def test_a_folder_that_gains_files_during_the_write_is_not_replaced(tmp_path):
    """A long write (a streamed conversion, an export) was allowed to replace ``out`` as it was;
    a file that came into it meanwhile is someone's: refused, named, nothing replaced."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OutputError, match=r"out gained NOTES\.md while this run wrote its replacement: it was not "
                                          r"replaced; move them out of it and run again$"):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            (tmp_path / "out" / "NOTES.md").write_text("mine")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["NOTES.md", "old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replacing_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [atomic.MANIFEST, "new.txt"]
    assert (tmp_path / "out" / atomic.MANIFEST).read_text() == "new.txt\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_outputs_are_readable_by_others(tmp_path, umask_022):
    """The four writers: converted folder, bundle, sampled JSONL, distillation checkpoint."""
    from hadaconv.distill.checkpoint import save_checkpoint
    from hadaconv.export import export_onnx
    from hadaconv.io import save_converted
    from hadaconv.nn import HadamardProjection
    from hadaconv.sample import write_jsonl
    from tiny_models import make_tiny

    model = nn.Sequential(HadamardProjection(16, block=4))
    save_converted(make_tiny("torch_mha"), tmp_path / "conv", meta={})
    export_onnx(model, tmp_path / "bundle", torch.randn(2, 16), portable=True)
    write_jsonl(["a", "b"], tmp_path / "text.jsonl")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=optimizer, counters={}, record={}, best=None,
                    fingerprint={}, main=True)
    assert _readable_tree(tmp_path) == {}
    assert {p.name for p in tmp_path.iterdir()} == {"conv", "bundle", "text.jsonl", "ckpt"}


def test_check_output_one_rule_and_one_wording(tmp_path):
    """The existence check every writer calls (converted folders, bundles, distilled folders,
    sampled JSONL): an empty folder may be written into, a non-empty one or an existing file
    needs overwrite, a file where a folder goes (or the reverse) is refused even with overwrite."""
    from hadaconv.errors import OutputError, cli_names

    folder, file = tmp_path / "out", tmp_path / "s.jsonl"
    assert atomic.check_output(folder, folder=True) == folder  # missing: fine
    folder.mkdir()
    assert atomic.check_output(folder, folder=True) == folder  # empty: fine
    file.write_text("{}\n")
    refusals = {}
    (folder / "config.json").write_text('{"hadaconv": {"layers": [0]}}')  # a converted folder
    for path, is_folder in ((folder, True), (file, False)):
        with pytest.raises(OutputError) as info:
            atomic.check_output(path, folder=is_folder)
        refusals[is_folder] = str(info.value)
        assert atomic.check_output(path, True, folder=is_folder) == path
    # The Python keyword here; the CLI's --overwrite is test_bad_inputs' rows.
    assert refusals[True] == f"{folder} already exists and is not empty: pass overwrite=True to replace it, or choose another folder"
    assert refusals[False] == f"{file} already exists: pass overwrite=True to replace it, or choose another file"
    with cli_names():
        with pytest.raises(OutputError, match="pass --overwrite to replace it"):
            atomic.check_output(file, folder=False)
    for path, is_folder, message in ((file, True, "exists and is not a folder"), (folder, False, "is a folder, not a file"),
                                     (tmp_path / "no" / "s.jsonl", False, "the folder .* does not exist")):
        with pytest.raises(OutputError, match=message):
            atomic.check_output(path, True, folder=is_folder)
    assert (folder / "config.json").is_file() and file.read_text() == "{}\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_check_output_finds_a_folder_that_refuses_writes_whatever_its_bits_say(tmp_path):
    """/proc lets root past the permission bits but creates no entry: found before the work
    (a newcomer's -o /sys/x was refused only after the conversion), and no probe is left behind."""
    from hadaconv.errors import OutputError

    with pytest.raises(OutputError, match=r"^cannot write /proc/hadaconv-out: .*: nothing can be created in /proc$"):
        atomic.check_output("/proc/hadaconv-out", folder=True)
    with pytest.raises(OutputError, match=r"^cannot write /proc/s\.jsonl: .*: nothing can be created in /proc$"):
        atomic.check_output("/proc/s.jsonl", folder=False)
    atomic.check_output(tmp_path / "a" / "b", folder=True)
    assert list(tmp_path.iterdir()) == []


def test_a_terminated_cli_run_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """SIGTERM (kill, a scheduler, a container stop) ends a CLI run like Ctrl-C, with the exit
    status a shell gives a terminated process (128 + 15), and the atomic write under way removes
    its temporary instead of leaving it behind."""
    import signal
    import threading

    from cli_runner import run_cli

    def terminated_midway(n):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(5)  # the handler interrupts this wait
        raise AssertionError("not interrupted")

    monkeypatch.setattr("hadaconv.hadamard.factorize", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_cli(capsys, "hadamard", "12")
    assert code == 143 and err == "terminated\n"  # one line: no blank line before it
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # put back for whoever embeds main()


@pytest.mark.parametrize("verb, patched", [("convert", "hadaconv.convert.convert_file"),
                                           ("export", "hadaconv.export.export_onnx")])
def test_an_interrupted_cli_run_says_what_it_left(verb, patched, tmp_path, capsys, monkeypatch):
    """Ctrl-C in convert or export: status 130 and one line saying that nothing was written (the
    output appears only at the end), with no blank line before it."""
    from cli_runner import run_cli
    from tiny_models import make_tiny

    folder = tmp_path / "m"
    make_tiny("llama").save_pretrained(folder)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patched, interrupted)
    code, _, err = run_cli(capsys, verb, folder, "-o", tmp_path / "out", *(["--calib", "none"] if verb == "convert"
                                                                           else []))
    what = "a conversion writes its output folder" if verb == "convert" else "an export writes its bundle"
    assert code == 130 and err.splitlines()[-1] == f"interrupted: {what} only when it ends, so nothing is half-written"
    assert "" not in err.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_check_output_never_replaces_an_input(tmp_path):
    """An output that is one of the run's inputs, a folder holding one, or inside one, is refused
    even with overwrite (``convert st -o st --overwrite`` destroyed the model it read; a bundle
    inside its converted folder changed the input); elsewhere, or next to a model object (no
    path), it is the usual check's business."""
    from hadaconv.errors import OutputError

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out, what in ((model, "is the input"), (tmp_path / "models", "is a folder holding the input")):
        with pytest.raises(OutputError, match=f"^the output {out} {what} {model}: writing it would replace the input"):
            atomic.check_output(out, True, folder=True, inputs=[None, model])
    with pytest.raises(OutputError, match="is the input"):  # the same place by another spelling
        atomic.check_output(tmp_path / "models" / ".." / "models" / "m", True, folder=True, inputs=[str(model)])
    inside = "is inside the input .*m: hadaconv never writes into its inputs; choose an output outside it$"
    for out, is_folder in ((model / "config.json", False), (model / "new.jsonl", False), (model / "onnx", True),
                           (model / "a" / "b", True), (tmp_path / "link" / "onnx", True)):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(model)
        with pytest.raises(OutputError, match=inside):  # sample HF -o HF/config.json, export conv -o conv/onnx
            atomic.check_output(out, True, folder=is_folder, inputs=[model])
    out = tmp_path / "other"
    assert atomic.check_output(out, True, folder=True, inputs=[model, None, object()]) == out
    gone = tmp_path / "gone"  # not on disk (a mistyped model, a keyword like "sample"): the loader's to refuse
    assert atomic.check_output(gone, True, folder=True, inputs=[gone, "sample"]) == gone
    assert (model / "config.json").read_text() == "{}"


def test_overwrite_replaces_only_folders_hadaconv_wrote(tmp_path):
    """overwrite replaces a converted folder or an ONNX bundle, never a folder of other files:
    ``-o ~/projects --overwrite`` would otherwise delete the user's work."""
    from hadaconv.errors import OutputError
    from hadaconv.export.bundle import METADATA

    ours = {"converted": {"config.json": '{"model_type": "llama", "hadaconv": {"layers": []}}'},
            "bundle": {METADATA: "{}", "model.onnx": ""}}
    theirs = {"notes": {"notes.txt": "mine"},
              "hf model": {"config.json": '{"model_type": "llama"}'},  # a model hadaconv did not write
              "hadaconv not a section": {"config.json": '{"hadaconv": 1}'},
              "broken json": {"config.json": '{"hadaconv": {'},
              "not utf-8": {"config.json": b"\xff\xfe"},
              "config folder": {"config.json/x": "x"},
              "nested past the stack": {"config.json": "[" * 100_000},
              "holds an output": {"conv/config.json": '{"hadaconv": {}}'},
              "converted, in a git clone": {"config.json": '{"hadaconv": {}}', ".git/HEAD": "ref"},
              "bundle, in an app": {METADATA: "{}", "app/main.py": ""}}
    for group, expected in ((ours, True), (theirs, False)):
        for name, files in group.items():
            folder = tmp_path / name
            for rel, content in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                write = (folder / rel).write_bytes if isinstance(content, bytes) else (folder / rel).write_text
                write(content)
            if expected:
                assert atomic.check_output(folder, True, folder=True) == folder, name
            else:
                with pytest.raises(OutputError, match="hadaconv did not write"):  # the entries named where known
                    atomic.check_output(folder, True, folder=True)
            assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == sorted(files)
    written = tmp_path / "written"  # by this version: its manifest lists what may be replaced
    with atomic_folder(written) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "model.onnx").write_text("")
    assert atomic.check_output(written, True, folder=True) == written
    (written / "model.onnx").unlink()  # fewer files than listed: still only what hadaconv wrote
    assert atomic.check_output(written, True, folder=True) == written
    (written / ".DS_Store").write_text("")  # a file manager's: replaced with the folder
    assert atomic.check_output(written, True, folder=True) == written
    (written / "NOTES.md").write_text("mine")
    (written / "results").mkdir()
    (written / "vocab.txt").symlink_to(tmp_path / "elsewhere")  # never written by hadaconv
    with pytest.raises(OutputError, match="written holds NOTES.md, results/, vocab.txt, which hadaconv did not "
                                          "write: overwrite=True replaces only what hadaconv wrote; move them out"):
        atomic.check_output(written, True, folder=True)
    for name in ("NOTES.md", "vocab.txt"):
        (written / name).unlink()
    (written / "results").rmdir()
    (written / atomic.MANIFEST).write_bytes(b"x\n" * (1 << 20))  # unreadable as a manifest: nothing is listed
    with pytest.raises(OutputError, match="holds config.json, which hadaconv did not write"):
        atomic.check_output(written, True, folder=True)
    earlier = tmp_path / "earlier"  # written before the manifest: only names hadaconv writes
    earlier.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.json", "model.onnx",
                 "sentencepiece.bpe.model"):  # every tokenizer file a converted folder copies (io.TOKENIZER_FILES)
        (earlier / name).write_text('{"hadaconv": {}}' if name == "config.json" else "")
    assert atomic.check_output(earlier, True, folder=True) == earlier
    (earlier / "NOTES.md").write_text("mine")
    with pytest.raises(OutputError, match="earlier holds NOTES.md, which hadaconv did not write"):
        atomic.check_output(earlier, True, folder=True)
    endless = tmp_path / "endless"  # a config.json that never ends is not read
    endless.mkdir()
    (endless / "config.json").symlink_to("/dev/zero")
    with pytest.raises(OutputError, match="holds files hadaconv did not write"):
        atomic.check_output(endless, True, folder=True)


def test_folder_outputs_never_replace_the_current_or_home_folder(tmp_path, monkeypatch):
    """A folder output replaces the whole folder: the current folder, the home folder and any
    folder holding either are refused, by any name (a newcomer's -o . --overwrite deleted files)."""
    from hadaconv.atomic import check_output
    from hadaconv.errors import OutputError

    home, work = tmp_path / "home", tmp_path / "work"
    (home / "docs").mkdir(parents=True)
    work.mkdir()
    (tmp_path / "link").symlink_to(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, what in ((".", "is the current folder"), (tmp_path / "link", "is the current folder"),
                      ("..", "is a folder holding the current folder"), (home, "is your home folder"),
                      (f"{home}/docs/..", "is your home folder")):
        with pytest.raises(OutputError, match=what):
            check_output(out, overwrite=True, folder=True)
    assert check_output("new", folder=True) == Path("new")  # inside the current folder: fine
    assert check_output(home / "docs", overwrite=True, folder=True) == home / "docs"  # inside the home folder
    monkeypatch.delenv("HOME")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))))
    assert check_output(home / "other", folder=True) == home / "other"  # no home folder: only the cwd check
