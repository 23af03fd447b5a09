"""The perimeter around the sandbox: nothing a recipe names runs or writes on the host.

Host programs' ELF closures are read from the files (and equal what ``ld.so --list``
prints for trusted system binaries), hostile .deb packages are refused before a byte is
written, package names do not depend on the locale, path sources stay inside the
recipe's directory and never copy what the user reads only through privilege.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from reprobuild.build import fetch
from reprobuild.build.elf import elf_closure, elf_interpreter, ld_so_conf_dirs
from reprobuild.build.fetch import unpack_deb
from reprobuild.build.inputs import host_closure
from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe
from reprobuild.build.sandboxing import BUILTIN_DEPENDENCIES, _module_root
from reprobuild.cli import main
from reprobuild.errors import FetchError, RecipeError
from tests.build.test_sources import info, make_deb
from tests.conftest import NOBODY, REPO, Unprivileged, need, need_tool


# -- ELF closures ----------------------------------------------------------------------
def ld_so_list(program: str, loader: str | None = None) -> list[str] | None:
    """The closure the old code found: run by the test, on trusted system files only."""
    interp = elf_interpreter(program) or loader
    if interp is None:
        return [program]
    result = subprocess.run([interp, "--list", program], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, check=False)
    if result.returncode != 0:
        return None
    files = {program, interp}
    for line in result.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0].strip()
            if target.startswith("/"):
                files.add(target)
        elif line.startswith("/"):
            files.add(line.split(" (", 1)[0])
    return sorted(files, key=os.fsencode)


def runtime_libraries() -> list[str]:
    """Every shared object the built-in steps' Python runtime loads (see sandboxing)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    roots = [os.path.join(stdlib, "lib-dynload")]
    roots += [r for r in (_module_root(n) for n in BUILTIN_DEPENDENCIES) if r]
    found = []
    for top in roots:
        for dirpath, _dirs, names in os.walk(top):
            found += [os.path.join(dirpath, n) for n in names if ".so" in n]
    return sorted(found)


@pytest.mark.parametrize("program", ["/usr/bin/tar", "/usr/bin/python3", "/bin/busybox",
                                     "/bin/bash", os.path.realpath(sys.executable)])
def test_closure_equals_ld_so_list(program: str) -> None:
    need(os.path.exists(program), f"{program} is not installed")
    assert elf_closure(program) == ld_so_list(program)


def test_runtime_library_closures_equal_ld_so_list() -> None:
    loader = elf_interpreter(os.path.realpath(sys.executable))
    libraries = runtime_libraries()
    assert len(libraries) > 20
    for lib in libraries:
        assert elf_closure(lib, loader=loader) == ld_so_list(lib, loader), lib


def compile_c(directory: Path, name: str, source: str, *flags: str) -> Path:
    need_tool("gcc")
    src = directory / f"{name}.c"
    src.write_text(source)
    out = directory / name
    subprocess.run(["gcc", "-o", str(out), str(src), *flags], check=True,
                   capture_output=True)
    return out


def test_rpath_runpath_and_origin_follow_ld_so(tmp_path: Path) -> None:
    """RPATH is inherited down the loading chain, RUNPATH is not; $ORIGIN expands."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    compile_c(a, "libtwo.so", "int two(void) { return 2; }", "-shared", "-fPIC")
    compile_c(b, "libone.so", "int two(void); int one(void) { return two(); }", "-shared",
              "-fPIC", f"-L{a}", "-ltwo")
    prog = "int one(void); int main(void) { return one(); }"
    old_tags = compile_c(tmp_path, "rpath", prog, f"-L{b}", "-lone",
                         "-Wl,--disable-new-dtags", f"-Wl,-rpath,{a}:$ORIGIN/b")
    new_tags = compile_c(tmp_path, "runpath", prog, f"-L{b}", "-lone",
                         "-Wl,--enable-new-dtags", f"-Wl,-rpath,{a}:$ORIGIN/b")
    expected = ld_so_list(str(old_tags))
    assert expected is not None and str(a / "libtwo.so") in expected
    assert elf_closure(str(old_tags)) == expected
    assert ld_so_list(str(new_tags)) is None  # libone's libtwo: RUNPATH is not inherited
    with pytest.raises(RecipeError, match=r"libtwo\.so \(needed by .*libone\.so\) not found"):
        elf_closure(str(new_tags))


def test_a_library_for_another_machine_is_skipped_as_ld_so_skips_it(tmp_path: Path) -> None:
    wrong, right = tmp_path / "wrong", tmp_path / "right"
    wrong.mkdir()
    right.mkdir()
    lib = compile_c(right, "libtwo.so", "int two(void) { return 2; }", "-shared", "-fPIC")
    foreign = bytearray(lib.read_bytes())
    foreign[18:20] = (183).to_bytes(2, "little")  # e_machine = EM_AARCH64
    (wrong / "libtwo.so").write_bytes(bytes(foreign))
    prog = compile_c(tmp_path, "prog", "int two(void); int main(void) { return two(); }",
                     f"-L{right}", "-ltwo", "-Wl,--enable-new-dtags",
                     f"-Wl,-rpath,{wrong}:{right}")
    expected = ld_so_list(str(prog))
    assert expected is not None and str(right / "libtwo.so") in expected
    assert elf_closure(str(prog)) == expected


def test_a_library_found_through_proc_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    compile_c(tmp_path, "libtwo.so", "int two(void) { return 2; }", "-shared", "-fPIC")
    prog = compile_c(tmp_path, "prog", "int two(void); int main(void) { return two(); }",
                     f"-L{tmp_path}", "-ltwo", "-Wl,-rpath,/proc/self/cwd")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=r"/proc/self/cwd/libtwo\.so lies in /proc"):
        elf_closure(str(prog))


def test_ld_so_conf_follows_includes_in_order(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("/opt/b\n# /opt/comment\n")
    (tmp_path / "conf.d" / "a.conf").write_text("/opt/a/ # trailing\ninclude ../loop.conf\n")
    (tmp_path / "loop.conf").write_text(f"include {tmp_path}/ld.so.conf\n/opt/loop\n")
    (tmp_path / "ld.so.conf").write_text("/opt/first\ninclude conf.d/*.conf\n/opt/last\n")
    assert ld_so_conf_dirs(str(tmp_path / "ld.so.conf")) == [
        "/opt/first", "/opt/a", "/opt/loop", "/opt/b", "/opt/last"]


@pytest.fixture
def hostile_elf(tmp_path: Path) -> tuple[Path, Path]:
    """An ELF program whose PT_INTERP is a script that writes a marker when run."""
    marker = tmp_path / "marker"
    script = tmp_path / "interp.sh"
    script.write_text(f"#!/bin/sh\necho ran > {marker}\n")
    script.chmod(0o755)
    evil = compile_c(tmp_path, "evil", "int main(void) { return 0; }",
                     f"-Wl,--dynamic-linker={script}")
    return evil, marker


@pytest.mark.parametrize("command", ["show", "build"])
@pytest.mark.parametrize("via_proc", [True, False])
def test_hostile_interpreter_never_runs(tmp_path: Path, hostile_elf: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch, command: str,
                                        via_proc: bool, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    evil, marker = hostile_elf
    monkeypatch.chdir(tmp_path)
    host = "/proc/self/cwd/evil" if via_proc else str(evil)
    recipe = tmp_path / "evil.toml"
    recipe.write_text(f'[sources.t]\nhost = "{host}"\n')
    code = main([command, "--store", str(tmp_path / "store"), str(recipe), "t"])
    assert code == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert ("lies in /proc" in err) if via_proc else ("interp.sh" in err)


def test_script_host_program_is_refused_with_advice(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    with pytest.raises(RecipeError, match=r"is a script \(#!/bin/sh\)") as exc:
        host_closure(str(script))
    assert exc.value.hint is not None and "path =" in exc.value.hint


@pytest.mark.parametrize("head", [b"\x7fELF", b"\x7fELF\x02\x01\x01" + b"\xff" * 80])
def test_malformed_elf_is_a_recipe_error(tmp_path: Path, head: bytes) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(head)
    (tmp_path / "r.toml").write_text(f'[sources.t]\nhost = "{bad}"\n')
    with pytest.raises(RecipeError, match="bad"):
        plan(load_recipe(str(tmp_path / "r.toml")))


def test_mutated_elf_headers_give_recipe_errors_only(tmp_path: Path) -> None:
    """The reader trusts no field: any corruption of a real program's headers is either
    read or refused with a RecipeError (never another exception, never a hang)."""
    original = Path("/bin/bash").read_bytes()
    rng = random.Random(10)
    refused = 0
    for i in range(400):
        target = tmp_path / f"mutant-{i}"  # a new path each time: no cached reading
        mutant = bytearray(original[:65536] if rng.random() < 0.1 else original)
        for _ in range(rng.randint(1, 8)):
            mutant[rng.randrange(1024) if rng.random() < 0.8 else
                   rng.randrange(len(mutant))] = rng.randrange(256)
        target.write_bytes(bytes(mutant))
        try:
            elf_closure(str(target))
        except RecipeError:
            refused += 1
    assert refused > 0


def test_host_program_through_proc_or_not_regular(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="lies in /proc"):
        host_closure(f"/proc/{os.getpid()}/exe")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(RecipeError, match="not a regular file"):
        host_closure(str(tmp_path / "fifo"))


# -- .deb packages ---------------------------------------------------------------------
def hostile_members(victim: Path) -> dict[str, list[tarfile.TarInfo]]:
    return {
        "symlink-then-file": [info("./x", tarfile.SYMTYPE, link=str(victim)), info("./x")],
        "through-symlink": [info("./d", tarfile.SYMTYPE, link=str(victim.parent)),
                            info(f"./d/{victim.name}")],
        "dotdot": [info(f"./../{victim.name}")],
        "absolute": [info(str(victim))],
        "hardlink-outside": [info("./h", tarfile.LNKTYPE, link=str(victim))],
        "hardlink-dotdot": [info("./h", tarfile.LNKTYPE, link=f"../{victim.name}")],
    }


def tar_of(members: list[tarfile.TarInfo]) -> bytes:
    """A tar of ``members`` in order; regular files hold b"overwritten"."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            if member.type == tarfile.REGTYPE:
                member.size = len(b"overwritten")
                tar.addfile(member, io.BytesIO(b"overwritten"))
            else:
                tar.addfile(member)
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(hostile_members(Path("/v"))))
def test_hostile_deb_is_refused_and_the_host_untouched(tmp_path: Path, case: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    members = hostile_members(victim)[case]
    deb = tmp_path / "evil.deb"
    make_deb(deb, tar_of(members), "xz")
    out = tmp_path / "unpacked" / "out"
    out.parent.mkdir()
    with pytest.raises(FetchError) as exc:
        unpack_deb(str(deb), str(out), label="evil=1.0")
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["evil.deb", "unpacked", "victim"]
    assert "package evil=1.0" in str(exc.value)
    assert repr(members[-1].name) in str(exc.value)


def test_decompression_bomb_is_refused(tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "MAX_DATA_TAR", 1 << 20)
    big = tarfile.TarInfo("./zeros")
    big.size = 4 << 20
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(big, io.BytesIO(bytes(big.size)))
    deb = tmp_path / "bomb.deb"
    make_deb(deb, buffer.getvalue(), "xz")
    assert deb.stat().st_size < 64 << 10
    with pytest.raises(FetchError, match=r"bomb=1: data\.tar\.xz unpacks to more than"):
        unpack_deb(str(deb), str(tmp_path / "out"), label="bomb=1")
    assert sorted(os.listdir(tmp_path)) == ["bomb.deb"]


def pax_deb(path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8") as tar:
        for name in ("./", "./usr/", "./usr/café"):
            member = tarfile.TarInfo(name)
            if name.endswith("/"):
                member.type, member.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(member)
            else:
                member.size = 3
                tar.addfile(member, io.BytesIO(b"abc"))
    make_deb(path, buffer.getvalue(), "xz")


LISTING = """
import os, sys
from reprobuild.build import fetch
from reprobuild.build.fetch import unpack_deb
from reprobuild.store import canon
from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe
deb, out, recipe = sys.argv[1:]
unpack_deb(deb, out)
names = sorted(os.listdir(os.fsencode(out + "/usr")))
print(sys.getfilesystemencoding(), names, canon.hash_path(out),
      plan(load_recipe(recipe)).nodes["p"].id)
"""


def test_package_names_are_bytes_whatever_the_locale(tmp_path: Path) -> None:
    deb = tmp_path / "p.deb"
    pax_deb(deb)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[sources.p]\ndeb = "pkg"\nversion = "1.0"\nsha256 = "{"a" * 64}"\n')
    locales = {"utf-8": {"LANG": "C.UTF-8"},
               "ascii": {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0",
                         "PYTHONCOERCECLOCALE": "0"}}
    results = {}
    for name, env in locales.items():
        result = subprocess.run(
            [sys.executable, "-c", LISTING, str(deb), str(tmp_path / name), str(recipe)],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
            capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        results[name] = result.stdout.split(" ", 1)
    assert results["utf-8"][0] == "utf-8" and results["ascii"][0] == "ascii"
    assert results["utf-8"][1] == results["ascii"][1]
    assert "[b'caf\\xc3\\xa9']" in results["ascii"][1]


# -- path sources ----------------------------------------------------------------------
def write_recipe(directory: Path, path: str, *extra: str) -> Path:
    recipe = directory / "r.toml"
    recipe.write_text("\n".join(["[sources.s]", f'path = "{path}"', *extra]) + "\n")
    return recipe


def test_path_outside_the_recipe_directory_needs_allow_outside(tmp_path: Path) -> None:
    (tmp_path / "outside").write_text("host file\n")
    (tmp_path / "outside").chmod(0o644)
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    (recipe_dir / "link").symlink_to(tmp_path / "outside")
    for path in ("../outside", str(tmp_path / "outside"), "link"):
        recipe = write_recipe(recipe_dir, path)
        with pytest.raises(RecipeError, match="outside the recipe's directory") as exc:
            plan(load_recipe(str(recipe)))
        assert exc.value.hint is not None and "allow-outside = true" in exc.value.hint
        assert "[sources.s]" in str(exc.value)
    recipe = write_recipe(recipe_dir, "../outside", "allow-outside = true")
    assert plan(load_recipe(str(recipe))).nodes["s"].id


def test_allow_keys_are_booleans_and_leave_ids_alone(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "f").chmod(0o644)
    plain = plan(load_recipe(str(write_recipe(tmp_path, "f")))).nodes["s"].id
    allowed = plan(load_recipe(str(write_recipe(
        tmp_path, "f", "allow-outside = true", "allow-private = true")))).nodes["s"].id
    assert plain == allowed
    with pytest.raises(RecipeError, match="allow-private: must be true or false"):
        load_recipe(str(write_recipe(tmp_path, "f", 'allow-private = "yes"')))


@pytest.mark.parametrize(("layout", "offender"), [
    ("shadow", "etc/shadow"),  # root reading a 0640 root:shadow file
    ("home", "root"),  # a 0700 home directory
])
def test_private_files_need_allow_private_as_root(tmp_path: Path, layout: str,
                                                  offender: str) -> None:
    need(os.geteuid() == 0, "needs root (root reads files others cannot)")
    tree = tmp_path / "tree"
    if layout == "shadow":
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "hostname").write_text("h\n")
        (tree / "etc" / "shadow").write_text("root:$6$secret:::\n")
        os.chmod(tree / "etc" / "shadow", 0o640)
    else:
        (tree / "root" / ".ssh").mkdir(parents=True)
        (tree / "root" / ".ssh" / "id").write_text("key\n")
        os.chmod(tree / "root", 0o700)
    os.chmod(tree, 0o755)
    recipe = write_recipe(tmp_path, "tree")
    with pytest.raises(RecipeError, match="only through privilege") \
            as exc:
        plan(load_recipe(str(recipe)))
    assert str(tree / offender) in str(exc.value)
    assert exc.value.hint is not None and "allow-private = true" in exc.value.hint
    assert plan(load_recipe(str(write_recipe(tmp_path, "tree", "allow-private = true"))))


def test_build_as_root_never_publishes_a_private_file(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    need(os.geteuid() == 0, "needs root (root reads files others cannot)")
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret:::\n")
    secret.chmod(0o640)
    recipe = write_recipe(tmp_path, "shadow")
    store = tmp_path / "store"
    assert main(["build", "--store", str(store), str(recipe), "s"]) == 2
    assert "allow-private" in capsys.readouterr().err
    assert not list((store / "out").iterdir())


OWN_FILES = """
import sys
from reprobuild.build.plan import plan
from reprobuild.build.recipe import load_recipe
from reprobuild.errors import RecipeError
try:
    print(plan(load_recipe(sys.argv[1])).nodes["s"].id)
except RecipeError as exc:
    print("refused:", exc)
"""


@pytest.mark.userns
def test_a_users_own_private_files_are_theirs(unprivileged: Unprivileged) -> None:
    """As uid 65534: its own 0600 file imports; a root file it reads through its group
    (0640) is refused, naming the file."""
    directory = unprivileged.scratch("own-files")
    mine = directory / "mine"
    mine.write_text("my notes\n")
    theirs = directory / "theirs"
    theirs.write_text("group readable\n")
    write_recipe(directory, "mine")
    (directory / "theirs.toml").write_text('[sources.s]\npath = "theirs"\n')
    if unprivileged.as_root:
        for path in (mine, directory / "r.toml", directory / "theirs.toml"):
            os.chown(path, NOBODY, NOBODY)
        os.chown(theirs, 0, NOBODY)
    mine.chmod(0o600)
    theirs.chmod(0o640)
    own = unprivileged.run(["python", "-c", OWN_FILES, str(directory / "r.toml")],
                           env={"HOME": str(directory)})
    assert own.returncode == 0 and len(own.stdout.strip()) == 64, own.stdout + own.stderr
    if unprivileged.as_root:
        other = unprivileged.run(["python", "-c", OWN_FILES,
                                  str(directory / "theirs.toml")],
                                 env={"HOME": str(directory)})
        # 65534 reads it only as a member of its group: not its own file, not for others.
        assert "refused:" in other.stdout and str(theirs) in other.stdout, \
            other.stdout + other.stderr


def test_private_host_program_is_refused_as_root(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "needs root (root reads files others cannot)")
    tool = tmp_path / "tool"
    tool.write_bytes(Path("/bin/busybox").read_bytes())
    tool.chmod(0o700)
    with pytest.raises(RecipeError, match="only through privilege"):
        host_closure(str(tool))
    tool.chmod(0o755)
    assert host_closure(str(tool)).files == {str(tool).lstrip("/"): str(tool)}


def test_symlinks_inside_a_path_source_are_imported_as_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "passwd").symlink_to("/etc/passwd")
    store = tmp_path / "store"
    recipe = write_recipe(tmp_path, "tree")
    assert main(["build", "--store", str(store), str(recipe), "s"]) == 0
    out = store / "out" / plan(load_recipe(str(recipe))).nodes["s"].id
    assert os.readlink(out / "passwd") == "/etc/passwd"


def test_default_store_is_created_private(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        (tmp_path / "f").write_text("x")
        recipe = write_recipe(tmp_path, "f")
        assert main(["show", str(recipe), "s"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "cache" / "reprobuild").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(("key", "value"), [("deb", "-oDir::Etc=/tmp/evil"),
                                            ("version", "-c/tmp/evil.conf")])
def test_deb_fields_cannot_be_apt_options(tmp_path: Path, key: str, value: str) -> None:
    fields = {"deb": "busybox-static", "version": "1:1.35.0-4", "sha256": "a" * 64,
              key: value}
    body = "".join(f'{k} = "{v}"\n' for k, v in fields.items())
    (tmp_path / "r.toml").write_text("[sources.p]\n" + body)
    with pytest.raises(RecipeError, match=f"\\[sources.p\\] {key}"):
        load_recipe(str(tmp_path / "r.toml"))
