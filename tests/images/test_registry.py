"""The format protocol: every registered module implements it, and every format's options
schema refuses unknown keys (with a suggestion) and values of the wrong type or range,
in recipes and on the command line, without importing a writer."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from reprobuild.build.recipe import load_recipe
from reprobuild.cli import main
from reprobuild.errors import ImageError, RecipeError
from reprobuild.images import conformance
from reprobuild.images.registry import FORMATS

ROOT = Path(__file__).resolve().parents[2]


def recipe(tmp_path: Path, image: str) -> str:
    path = tmp_path / "r.toml"
    path.write_text('[sources.files]\npath = "."\n[images.root]\nfrom = "files"\n' + image)
    return str(path)


def test_conformance_lists_every_registered_module() -> None:
    listed = {**conformance.TREE_FORMATS, **conformance.DISK_FORMATS}
    assert sorted(listed) == sorted(FORMATS)
    for name, fmt in FORMATS.items():
        assert listed[name] is importlib.import_module(fmt.module)
        assert name in (conformance.TREE_FORMATS if fmt.kind == "tree"
                        else conformance.DISK_FORMATS)


def test_misspelt_ext4_option_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    path = recipe(tmp_path, 'format = "ext4"\nhash_sed = "abc"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "[images.root] hash_sed" in info.value.message
    assert "did you mean 'hash_seed'" in (info.value.hint or "")


def test_unknown_option_far_from_any_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown tar option 'whatever'"):
        load_recipe(recipe(tmp_path, 'format = "tar"\nwhatever = 1\n'))


@pytest.mark.parametrize(("line", "message"), [
    ('format = "squashfs"\ncompression_level = "high"', "must be an integer"),
    ('format = "squashfs"\ncompression_level = 40', "out of range"),
    ('format = "squashfs"\nexportable = 1', "must be true or false"),
    ('format = "ext4"\nhash_version = "md5"', "is not one of half_md4, tea"),
    ('format = "cpio"\nxattrs = "keep"', "is not one of ignore"),
])
def test_option_values_are_typed(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(tmp_path, line + "\n"))


def test_command_line_option_is_checked_by_the_schema(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    (tmp_path / "src").mkdir()
    out = tmp_path / "o.img"
    code = main(["image", "--format", "ext4", "-o", "inodez=5", str(tmp_path / "src"),
                 str(out)])
    assert code == 2
    assert "did you mean 'inodes'" in capsys.readouterr().err
    assert not out.exists()


def test_command_line_option_is_typed_by_the_schema() -> None:
    schema = FORMATS["ext4"].options
    assert schema.parse_text("inodes", "12") == 12
    assert schema.parse_text("hash_seed", "1234") == "1234"  # a UUID, never an integer
    with pytest.raises(ImageError, match="must be an integer"):
        schema.parse_text("inodes", "many")


def test_parsing_a_recipe_imports_no_writer() -> None:
    code = ("import sys; from reprobuild.build.recipe import load_recipe; "
            "load_recipe('recipes/hello.toml'); "
            "print(sorted(m for m in sys.modules if m.startswith('reprobuild.images.')))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
    assert shown.strip() == "['reprobuild.images.protocol', 'reprobuild.images.registry']"


@pytest.mark.parametrize("name", sorted(n for n, f in FORMATS.items() if f.kind == "tree"))
def test_every_format_refuses_an_unknown_command_line_option(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    (tmp_path / "src").mkdir()
    out = tmp_path / "o.img"
    code = main(["image", "--format", name, "-o", "composefs=true", str(tmp_path / "src"),
                 str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    # once, named for the format, with the -o keys it does take
    assert f"error: unknown {name} option 'composefs'\n" in err
    assert f"{name}'s -o options: " in err


@pytest.mark.parametrize("name", sorted(n for n, f in FORMATS.items() if f.kind == "tree"))
def test_a_common_key_given_as_o_names_its_flag(name: str) -> None:
    schema = FORMATS[name].options
    key = schema.common[0] if schema.common else "files"
    with pytest.raises(ImageError) as info:
        schema.parse_text(key, "1")
    assert info.value.hint == f"use --{key.replace('_', '-')}"


def test_a_misspelt_common_key_suggests_its_flag() -> None:
    with pytest.raises(ImageError) as info:
        FORMATS["erofs"].options.parse_text("lable", "x")
    assert (info.value.hint or "").startswith("did you mean --label?")


def test_every_format_refuses_the_common_keys_it_would_ignore(tmp_path: Path) -> None:
    values = {"size": '"1M"', "uuid": '"12345678-1234-1234-1234-123456789abc"',
              "label": '"x"', "compress": '"zstd"', "block_size": "4096"}
    refused = []
    for name, fmt in sorted(FORMATS.items()):
        for key, value in values.items():
            path = recipe(tmp_path, f'format = "{name}"\n{key} = {value}\n')
            try:
                load_recipe(path)
            except RecipeError as exc:
                if "take no" in exc.message:
                    assert key not in fmt.options.common
                    refused.append(f"{name}.{key}")
                continue
            assert key in fmt.options.common, f"{name} accepted {key}"
    assert {"squashfs.label", "squashfs.uuid", "tar.label", "verity.size"} <= set(refused)


def test_squashfs_refuses_a_label_it_cannot_store(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    for flag in (["--label", "x"], ["--uuid", "12345678-1234-1234-1234-123456789abc"]):
        code = main(["image", "--format", "squashfs", *flag, str(tmp_path / "src"),
                     str(tmp_path / "o.img")])
        assert code == 2
        assert not (tmp_path / "o.img").exists()
