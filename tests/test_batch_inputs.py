"""Batch inputs: discovery in folders and list files, the mirrored output tree, names that cannot leave
the output folder, collisions, grouping into tasks, leftover temporary outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vipsnorm.batch.inputs import (
    DEFAULT_INCLUDE,
    Entry,
    Item,
    discover,
    group,
    output_folder,
    plan,
    read_list,
    remove_part_files,
    safe_relative,
)
from vipsnorm.errors import OutputError
from vipsnorm.io.write import atomic_path


def touch(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture()
def tree(tmp_path) -> Path:
    root = tmp_path / "archive"
    for rel in ("a.svs", "lab1/x.jpg", "lab1/deep/y.PNG", "lab2/x.jpg", "lab2/notes.txt", "lab2/.hidden.jpg",
                ".cache/z.jpg", "lab2/.x.vipsnorm-part-0123abcd.jpg"):  # fmt: skip
        touch(root / rel)
    return root


def rel(entries, root: Path) -> list[tuple[str, str, str]]:
    return [(os.path.relpath(e.path, root), e.rel_dir, e.name) for e in entries]


# --------------------------------------------------------------------------------------------------
# discovery


def test_folder_is_searched_recursively_and_mirrored(tree):
    entries = discover([tree])
    assert rel(entries, tree) == [
        ("a.svs", "", "a"),
        ("lab1/deep/y.PNG", "lab1/deep", "y"),  # suffixes match case-insensitively
        ("lab1/x.jpg", "lab1", "x"),
        ("lab2/x.jpg", "lab2", "x"),
    ]  # hidden files and folders, temporary outputs and non-image files are left out
    assert all(e.error is None and os.path.isabs(e.path) for e in entries)


def test_include_and_exclude_patterns(tree):
    assert rel(discover([tree], include=["*.jpg"]), tree) == [("lab1/x.jpg", "lab1", "x"), ("lab2/x.jpg", "lab2", "x")]
    assert rel(discover([tree], include=["lab1/*"]), tree) == [("lab1/deep/y.PNG", "lab1/deep", "y"), ("lab1/x.jpg", "lab1", "x")]
    assert [e.name for e in discover([tree], exclude=["lab2/*", "*.svs"])] == ["y", "x"]


def test_files_given_by_name_go_to_the_top_whatever_their_suffix(tree):
    entries = discover([tree / "lab2" / "notes.txt", tree / "lab1" / "deep" / "y.PNG"])
    assert [(e.rel_dir, e.name) for e in entries] == [("", "notes"), ("", "y")]


def test_output_folder_and_duplicates_are_skipped(tree):
    out = tree / "lab1"  # normalizing the archive into a folder inside it: never read back as input
    entries = discover([tree, tree / "a.svs", tree / "lab2" / ".." / "a.svs"], skip=[out])
    assert rel(entries, tree) == [("a.svs", "", "a"), ("lab2/x.jpg", "lab2", "x")]


def test_names_of_one_file_with_one_output_are_one_input_under_the_first_name(tmp_path):
    a, b = touch(tmp_path / "real" / "a.jpg"), touch(tmp_path / "real" / "b.jpg")
    (tmp_path / "link").symlink_to("real")  # a folder named twice: the same outputs, the same work
    (tmp_path / "list.csv").write_text("input,output\nlink/a.jpg,A\n")  # and one output named in a list
    entries = discover([tmp_path / "real", tmp_path / "link"], [tmp_path / "list.csv"])
    assert [e.path for e in entries] == [str(a), str(b)]
    first = discover([tmp_path / "link", tmp_path / "real"])  # the first name given is kept
    assert [e.path for e in first] == [str(tmp_path / "link" / "a.jpg"), str(tmp_path / "link" / "b.jpg")]
    assert [i.error for i in plan(entries, tmp_path / "out")] == [None, None]


def test_one_file_under_two_outputs_is_two_inputs_each_written_to_its_place(tmp_path):
    """An ML layout links one pool into train/ and val/: both trees must be complete (before, the
    second name was dropped silently: no output, no row)."""
    pool = touch(tmp_path / "pool" / "x.png")
    ds = tmp_path / "ds"
    for split in ("train", "val"):
        (ds / split / "cat").mkdir(parents=True)
        (ds / split / "cat" / "x.png").symlink_to(pool)
    touch(tmp_path / "pool2" / "y.png")
    for split in ("train", "val"):  # and whole folders linked twice
        (ds / split / "dog").symlink_to(tmp_path / "pool2")
    (tmp_path / "alias.png").symlink_to(pool)  # a file named directly under another name
    entries = discover([ds, tmp_path / "alias.png", pool])
    assert [(e.rel_dir, e.name) for e in entries] == [
        ("train/cat", "x"), ("train/dog", "y"), ("val/cat", "x"), ("val/dog", "y"), ("", "alias"), ("", "x"),
    ]  # fmt: skip
    assert [i.error for i in plan(entries, tmp_path / "out")] == [None] * 6


def test_a_fit_takes_every_file_once_whatever_its_names(tmp_path):
    pool = touch(tmp_path / "pool" / "x.png")
    for split in ("train", "val"):
        (tmp_path / "ds" / split).mkdir(parents=True)
        (tmp_path / "ds" / split / "x.png").symlink_to(pool)
    (tmp_path / "link").symlink_to(tmp_path / "ds")
    entries = discover([tmp_path / "ds", tmp_path / "link", pool], once_per="file")
    assert [e.path for e in entries] == [str(tmp_path / "ds" / "train" / "x.png")]
    with pytest.raises(ValueError, match="once_per"):
        discover([pool], once_per="name")


def test_plan_asks_again_neither_for_the_output_folder_nor_for_the_files_discover_resolved(tmp_path, monkeypatch):
    """Per input, plan() makes one stat (size and mtime): the output folder's real path is found once,
    and the file each name leads to comes from discover (which made the one lstat it needs)."""
    for i in range(50):
        touch(tmp_path / "in" / f"d{i % 5}" / f"x{i}.jpg")
    entries = discover([tmp_path / "in"])
    out = tmp_path / "out"
    calls = {"realpath": [], "islink": 0}
    real_realpath, real_islink = os.path.realpath, os.path.islink

    def realpath(path, *args, **kwargs):
        calls["realpath"].append(os.fspath(path))
        return real_realpath(path, *args, **kwargs)

    def islink(path):
        calls["islink"] += 1
        return real_islink(path)

    monkeypatch.setattr(os.path, "realpath", realpath)
    monkeypatch.setattr(os.path, "islink", islink)
    items = plan(entries, out)
    assert [i.error for i in items] == [None] * 50
    assert calls["islink"] == 0
    assert calls["realpath"].count(str(out)) == 1  # not once per input
    assert len(calls["realpath"]) <= 1 + 2 * 5  # the root, then per folder: the input's and the output's


def test_hard_links_are_inputs_of_their_own(tmp_path):
    a = touch(tmp_path / "p" / "a.jpg")
    os.link(a, touch(tmp_path / "q" / "x").parent / "a.jpg")  # one place each in the mirrored tree
    assert [e.rel_dir for e in discover([tmp_path], include=["*.jpg"])] == ["p", "q"]


def test_the_output_folder_given_as_input_is_an_error(tree):
    (entry,) = discover([tree / "lab1"], skip=[tree])
    assert entry.error == f"{tree / 'lab1'}: is the output folder or inside it; choose another -o folder"


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (entry,) = discover([tmp_path / "empty"])
    assert entry.error.startswith(str(tmp_path / "empty")) and "directory" in entry.error


def test_missing_file_is_kept_for_the_worker_to_report(tmp_path):
    (entry,) = discover([tmp_path / "missing.jpg"])
    assert entry.error is None and entry.path == str(tmp_path / "missing.jpg")


# --------------------------------------------------------------------------------------------------
# list files


def test_text_list_relative_to_its_folder_mirrors_its_tree(tmp_path):
    lists = tmp_path / "lists"
    touch(lists / "s1" / "a.jpg")
    touch(lists / "b.jpg")
    # a blank line and a line of spaces are skipped; a CRLF line ending is not part of the name
    (lists / "run.txt").write_bytes(b"# inputs\ns1/a.jpg\n\n  \t\nb.jpg\r\n" + bytes(lists / "s1" / "a.jpg") + b"\n")
    entries = discover(lists=[lists / "run.txt"])
    assert [(e.path, e.rel_dir, e.name) for e in entries] == [
        (str(lists / "s1" / "a.jpg"), "s1", "a"),  # the absolute repeat of the first line is dropped
        (str(lists / "b.jpg"), "", "b"),
    ]


def test_a_text_list_names_a_file_starting_with_a_hash_as_dot_slash(tmp_path):
    touch(tmp_path / "#7.jpg")
    (tmp_path / "run.txt").write_text("#7.jpg\n./#7.jpg\n")  # a comment, then the file
    assert [e.path for e in discover(lists=[tmp_path / "run.txt"])] == [str(tmp_path / "#7.jpg")]


def test_list_outside_its_folder_mirrors_the_common_folder(tmp_path):
    touch(tmp_path / "data" / "p" / "a.jpg")
    touch(tmp_path / "data" / "q" / "b.jpg")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "run.txt").write_text("../data/p/a.jpg\n../data/q/b.jpg\n")
    entries = discover(lists=[tmp_path / "lists" / "run.txt"])
    assert [(e.rel_dir, e.name) for e in entries] == [("p", "a"), ("q", "b")]
    assert entries[0].path == str(tmp_path / "data" / "p" / "a.jpg")


def test_csv_list_with_output_names(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    (tmp_path / "run.csv").write_text("Input,output\na.jpg,sets/train/first.png\nb.jpg,\n")
    entries = discover(lists=[tmp_path / "run.csv"])
    assert [(e.rel_dir, e.name) for e in entries] == [("sets/train", "first"), ("", "b")]
    assert read_list(tmp_path / "run.csv") == [("a.jpg", "sets/train/first.png"), ("b.jpg", None)]


@pytest.mark.parametrize(
    "name",
    ["../x.jpg", "a/../../x.jpg", "ok/../x.jpg", "/etc/x.jpg", "\\\\server\\x.jpg", "..\\x.jpg", "C:x.jpg", "", "a/.x"],
)
def test_output_names_that_could_leave_the_folder_are_errors(name, tmp_path):
    touch(tmp_path / "a.jpg")
    (tmp_path / "run.csv").write_text(f'input,output\na.jpg,"{name}"\n')
    (entry,) = discover(lists=[tmp_path / "run.csv"])
    if name == "":  # an empty output cell means "mirror"
        assert entry.error is None and entry.rel_dir == ""
        return
    assert entry.error is not None and entry.error.startswith(str(tmp_path / "a.jpg")), entry
    assert "nothing written" in entry.error
    with pytest.raises(ValueError):
        safe_relative(name)


def test_safe_relative_keeps_plain_names():
    assert safe_relative("a/./b\\c.jpg").as_posix() == "a/b/c.jpg"
    assert safe_relative("x..y.jpg").as_posix() == "x..y.jpg"  # '..' inside a name is a name


def test_list_names_are_taken_exactly_spaces_and_all(tmp_path):
    # " lead.jpg" and "lead.jpg" are two files: a list naming the first must never process the second
    sp = tmp_path / "sp"
    lead, plain, trail = touch(sp / " lead.jpg"), touch(sp / "lead.jpg"), touch(sp / "trail.jpg ")
    (sp / "run.txt").write_text(" lead.jpg\ntrail.jpg \r\n   \n")  # the line of spaces is skipped
    (sp / "run.csv").write_text('input,output\n" lead.jpg",\ntrail.jpg , x.png\nlead.jpg,\n" ",\n')
    assert read_list(sp / "run.txt") == [(" lead.jpg", None), ("trail.jpg ", None)]
    assert read_list(sp / "run.csv") == [(" lead.jpg", None), ("trail.jpg ", " x.png"), ("lead.jpg", None)]
    entries = discover(lists=[sp / "run.txt", sp / "run.csv"])
    assert [(e.path, e.rel_dir, e.name) for e in entries] == [
        (str(lead), "", " lead"),
        (str(trail), "", "trail"),  # (Path("trail.jpg ").stem)
        (str(trail), "", " x"),  # the output name exactly as written too
        (str(plain), "", "lead"),
    ]
    assert all(i.error is None and i.size == 10 for i in plan(entries, tmp_path / "out"))


@pytest.mark.parametrize(
    "name", [".y.vipsnorm-part-deadbeef.jpg", ".y.vipsnorm-part-deadbeef.svs", ".vipsnorm-run-0123456789abcdef", ".vipsnorm-rows.png"]
)
def test_an_output_named_like_vipsnorms_own_files_is_refused(name, tmp_path):
    # the run's own cleanup deletes a file named like its temporary outputs: such an input would be
    # normalized, reported ok, and its output deleted, on every run
    given = touch(tmp_path / "odd" / name)
    (tmp_path / "odd" / "run.txt").write_text(name + "\n")
    for entries in (discover([given]), discover(lists=[tmp_path / "odd" / "run.txt"])):
        (item,) = plan(entries, tmp_path / "out")
        assert item.error is not None and item.error.startswith(f"{given}: output "), item
        assert "vipsnorm keeps for its own temporary files" in item.error and "nothing written" in item.error


def test_other_hidden_names_given_by_name_keep_their_outputs(tmp_path):
    names = [".scan.jpg", "a.vipsnorm-part-deadbeef.jpg", ".y.vipsnorm-part-deadbeef", ".y.vipsnorm-part-deadbeef.x.jpg"]
    entries = discover([touch(tmp_path / name) for name in names])
    assert [(i.name, i.error) for i in plan(entries, tmp_path / "out")] == [
        (".scan", None),
        ("a.vipsnorm-part-deadbeef", None),  # not hidden: never a temporary file
        (".y", None),  # (its suffix is ".vipsnorm-part-deadbeef")
        (".y.vipsnorm-part-deadbeef.x", None),  # two suffixes once written: not a temporary file's name
    ]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_fifos_and_devices_are_refused_before_any_work(tmp_path):
    fifo, listed, link = tmp_path / "pipe.jpg", tmp_path / "listed.png", tmp_path / "z.jpg"
    os.mkfifo(fifo)
    os.mkfifo(listed)
    link.symlink_to("/dev/zero")
    (tmp_path / "run.txt").write_text("listed.png\n/dev/null\n")
    items = plan(discover([fifo, "/dev/zero", link], lists=[tmp_path / "run.txt"]), tmp_path / "out")
    assert [i.input for i in items] == [str(fifo), "/dev/zero", str(link), str(listed), "/dev/null"]
    for item in items:
        assert item.error == f"{item.input}: not a regular file (a FIFO, device or socket); nothing read"


def test_csv_list_without_input_column_is_refused(tmp_path):
    (tmp_path / "run.csv").write_text("path\na.jpg\n")
    with pytest.raises(ValueError, match="'input' column"):
        discover(lists=[tmp_path / "run.csv"])


# --------------------------------------------------------------------------------------------------
# planning


def test_plan_refuses_a_second_input_with_the_same_output_name(tmp_path):
    a, b, c = touch(tmp_path / "p" / "x.svs"), touch(tmp_path / "q" / "X.tif"), touch(tmp_path / "q" / "y.jpg", 7)
    items = plan(discover([a, b, c]), tmp_path / "out")
    assert [i.error is None for i in items] == [True, False, True]
    assert str(b) in items[1].error and str(a) in items[1].error and "already the output of" in items[1].error
    assert (items[2].size, items[2].mtime_ns) == (7, c.stat().st_mtime_ns)


def test_plan_refuses_outputs_that_could_replace_inputs(tmp_path):
    out = tmp_path / "out"
    inside = touch(out / "a.jpg")  # normalize out/a.jpg -o out: its output is itself
    outside = touch(tmp_path / "a.png")  # its output out/a.* could be out/a.jpg, another input
    mirrored = touch(tmp_path / "data" / "sub" / "c.png")  # data/ mirrored: out/sub/c.* ...
    in_out = touch(out / "sub" / "c.jpg")  # ... is where this input lives
    fine = touch(tmp_path / "b.png")
    items = plan(discover([inside, outside, tmp_path / "data", in_out, fine]), out)
    by_path = {i.input: i for i in items}
    assert "could overwrite the input" in by_path[str(inside)].error
    assert "another input of this run" in by_path[str(outside)].error and str(inside) in by_path[str(outside)].error
    assert "another input of this run" in by_path[str(mirrored)].error and str(in_out) in by_path[str(mirrored)].error
    assert by_path[str(fine)].error is None


def test_plan_compares_outputs_as_written_a_backslash_separating_folders(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    first, second = touch(data / "a" / "b" / "x.jpg"), touch(data / "a\\b" / "x.jpg")
    items = plan(discover([data]), out)
    assert [i.input for i in items] == [str(first), str(second)]
    assert items[0].error is None and items[0].rel_dir == "a/b"
    assert items[1].rel_dir == "a/b"  # the folder output_folder makes, where a rerun looks for it
    assert items[1].error == (
        f"{second}: output {out / 'a' / 'b' / 'x'}.* is already the output of {first}; "
        "rename one of them or give output names in a --list CSV"
    )
    assert output_folder(out, items[1].rel_dir) == out / "a" / "b"


def test_plan_refuses_an_output_replacing_an_input_through_a_backslash(tmp_path):
    out = tmp_path / "out"
    victim, other = touch(out / "a" / "b" / "x.jpg"), touch(tmp_path / "data" / "a\\b" / "x.jpg")
    items = plan(discover([tmp_path / "data", victim]), out)
    assert "could overwrite another input of this run" in items[0].error and str(victim) in items[0].error
    assert items[0].input == str(other) and items[1].error is None  # out/a/b/x.jpg -> out/x.*


def test_plan_follows_symbolic_links_to_folders_inside_the_output(tmp_path):
    out = tmp_path / "out"
    victim = touch(out / "real" / "x.jpg")
    (out / "alias").symlink_to("real")
    aliased, beside = touch(tmp_path / "data" / "alias" / "x.jpg"), touch(tmp_path / "data" / "real" / "y.jpg")
    items = plan(discover([tmp_path / "data", victim]), out)
    by_path = {i.input: i for i in items}
    error = by_path[str(aliased)].error
    assert f"output {out / 'alias' / 'x'}.* (that is {out / 'real' / 'x'}.*, links followed)" in error
    assert "could overwrite another input of this run" in error and str(victim) in error
    assert by_path[str(beside)].error is None and by_path[str(victim)].error is None
    # two outputs, one through the link and one not, are one output
    touch(tmp_path / "more" / "alias" / "y.jpg")
    last = plan(discover([tmp_path / "data", tmp_path / "more"]), out)[-1]
    assert "already the output of" in last.error and str(beside) in last.error


def test_plan_refuses_an_input_inside_the_output_reached_through_a_symlinked_file(tmp_path):
    out = tmp_path / "out"
    victim = touch(out / "x.jpg")
    (tmp_path / "x.jpg").symlink_to(victim)  # its output is out/x.*: the file the link leads to
    (item,) = plan(discover([tmp_path / "x.jpg"]), out)
    assert "could overwrite the input" in item.error


def test_plan_refuses_an_output_folder_leading_outside(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "link").symlink_to(elsewhere)
    source = touch(tmp_path / "data" / "link" / "x.jpg")
    (item,) = plan(discover([tmp_path / "data"]), out)
    assert item.error == (
        f"{source}: output folder {out / 'link'} leads outside the output folder {out} (a symbolic link?); "
        "nothing written"
    )


def test_plan_refuses_names_too_long_for_the_file_system(tmp_path):
    longest = touch(tmp_path / ("L" * 251 + ".jpg"))  # out/L{251}.jpg: 255 bytes, fits
    named = Entry(str(tmp_path / "a.jpg"), "", "M" * 252)  # as a --list CSV output name makes them
    deep = Entry(str(tmp_path / "b.jpg"), "D" * 256, "x")
    items = plan(discover([longest]) + [named, deep], tmp_path / "out")
    assert items[0].error is None
    assert items[1].error == (
        f"{tmp_path / 'a.jpg'}: output {tmp_path / 'out' / ('M' * 252)}.* needs a name of more than 255 bytes, "
        "too long for the file system; rename the input, or give a shorter output name in a --list CSV"
    )
    assert items[2].error.startswith(f"{tmp_path / 'b.jpg'}: output folder {tmp_path / 'out' / ('D' * 256)} has a name")


def items_of(sizes, solo=()) -> list[Item]:
    return [Item(i, f"/d/f{i}{'.svs' if i in solo else '.jpg'}", "", f"f{i}", size) for i, size in enumerate(sizes)]


def test_group_small_files_and_slides_alone():
    items = items_of([10] * 7 + [100, 5, 5], solo={8})
    groups = group(items, max_files=3, max_bytes=1000, solo_bytes=100)
    indices = [[i.index for i in g] for g in groups]
    assert indices == [[7], [8], [0, 1, 2], [3, 4, 5], [6, 9]]  # solo first, largest first


def test_group_respects_bytes():
    groups = group(items_of([40, 40, 40, 10]), max_files=10, max_bytes=90, solo_bytes=1000)
    assert [[i.index for i in g] for g in groups] == [[0, 1], [2, 3]]


def test_default_include_covers_the_writable_formats():
    assert {"*.jpg", "*.png", "*.tif", "*.svs", "*.ndpi", "*.mrxs"} <= set(DEFAULT_INCLUDE)


# --------------------------------------------------------------------------------------------------
# writing


def test_output_folder_is_created_inside_the_root(tmp_path):
    assert output_folder(tmp_path, "a/b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    assert output_folder(tmp_path, "") == tmp_path


@pytest.mark.parametrize("rel_dir", ["../x", "/abs", "a/../../x"])
def test_output_folder_refuses_relative_escapes(rel_dir, tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    with pytest.raises(OutputError):
        output_folder(root, rel_dir)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_output_folder_refuses_a_symlink_out(tmp_path):
    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "link").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="outside the output folder"):
        output_folder(root, "link/sub")
    assert not (elsewhere / "sub").exists()


def test_output_folder_errors_name_no_file_so_that_the_caller_names_the_input(tmp_path):
    root = tmp_path / "out"
    touch(root / "a")  # a file where a folder is needed
    with pytest.raises(OutputError) as caught:
        output_folder(root, "a/b")
    assert str(caught.value.about("/in/x.jpg")) == (
        f"/in/x.jpg: cannot create the output folder {root / 'a' / 'b'} (Not a directory)"
    )
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(OutputError) as caught:
        output_folder(root, "link/sub")
    assert str(caught.value.about("/in/x.jpg")).startswith(f"/in/x.jpg: output folder {root / 'link' / 'sub'} leads")
    with pytest.raises(OutputError) as caught:
        output_folder(root, "../x")
    assert str(caught.value.about("/in/x.jpg")).startswith("/in/x.jpg: output folder '../x' in ")


def test_leftover_part_files_of_long_names_are_recognized(tmp_path):
    left = []
    for stem in ("L" * 251, "é" * 125 + "L"):  # 251 bytes each: their temporary names are cut short
        with atomic_path(tmp_path / f"{stem}.jpg") as temp:
            temp.write_bytes(b"done")
            left.append(tmp_path / temp.name)
    for part in left:
        part.write_bytes(b"half")  # what a run killed mid-write leaves
    assert sorted(remove_part_files([tmp_path])) == sorted(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["L" * 251 + ".jpg", "é" * 125 + "L.jpg"])


def test_leftover_part_files_are_removed_and_nothing_else(tmp_path):
    keep = [touch(tmp_path / "a.jpg"), touch(tmp_path / ".hidden.jpg"), touch(tmp_path / ".a.vipsnorm-part-xyz.jpg")]
    part = tmp_path / ".a.vipsnorm-part-0123abcd.jpg"
    part.write_bytes(b"half a JPEG")
    with pytest.raises(RuntimeError):  # what a failed write leaves: nothing (atomic_path cleans up)
        with atomic_path(tmp_path / "b.tif") as temp:
            temp.write_bytes(b"partial")
            raise RuntimeError
    assert remove_part_files([tmp_path, tmp_path / "missing"]) == [part]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_a_part_file_that_cannot_be_deleted_is_passed_over(tmp_path, monkeypatch):
    """One leftover the run may not delete (EACCES, EROFS: another user's, a read-only snapshot) must
    not end a run that can do its work; the others are deleted."""
    stuck = tmp_path / "a" / ".x.vipsnorm-part-0123abcd.jpg"
    other = tmp_path / "a" / ".y.vipsnorm-part-0123abcd.jpg"
    more = tmp_path / "b" / ".z.vipsnorm-part-0123abcd.jpg"
    for part in (stuck, other, more):
        touch(part)
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == stuck.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    assert sorted(remove_part_files([tmp_path / "a", tmp_path / "b"])) == sorted([other, more])
    assert stuck.exists() and not other.exists() and not more.exists()
