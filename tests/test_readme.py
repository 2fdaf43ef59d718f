"""The commands of the README and of docs/, extracted from them: an edit that breaks one fails here; and the
links between those pages, which a moved or renamed page or heading would break."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from asr_dist.cli import make_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the pages whose commands are checked


def commands_in(page: Path) -> list[str]:
    """Every command of the page's ```bash blocks (continuation lines joined, comments dropped)."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and not line.startswith("."):
                commands.append(line)
    return commands


def readme_commands() -> list[str]:
    return commands_in(REPO / "README.md")


def documented_commands() -> list[str]:
    """The commands of the README and of every page in docs/, each once."""
    return list(dict.fromkeys(c for page in PAGES for c in commands_in(page)))


def test_the_two_commands_at_the_top_are_make_targets():
    top = readme_commands()[:2]
    assert top == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_commands_are_found():
    """The extraction itself: every page with a bash block yields commands, and the README shows one for
    each of building shards, training, launching on several GPUs and evaluating."""
    for page in PAGES:
        if "```bash" in page.read_text(encoding="utf-8"):
            assert commands_in(page), page
    readme = readme_commands()
    for start in ("asr-dist shards build", "asr-dist train", "torchrun", "sbatch", "asr-dist evaluate"):
        assert any(c.startswith(start) for c in readme), start


ELIDED = "…"  # the docs' "and the rest": dropped, or a placeholder where an option's value is elided


def words_of(command: str) -> list[str]:
    words = []
    for w in shlex.split(command):
        if w != ELIDED or (words and words[-1].startswith("-")):
            words.append(w)
    return words[1:] if words[0] == "sudo" else words


def launcher_parses(words: list[str]) -> None:
    """The launcher's own options, by the launcher's own parser: a misspelt --nproc_per_node fails here."""
    if words[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        parse_args(words[1:])
    elif words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        get_args_parser().parse_args(words[1:])
    else:
        assert words[0] == "python", words


def overrides_fit_the_schema(args, command: str) -> None:
    """Every `section.key=value` of a train command names a config key and has a value of its type, merged
    over the YAML it names (the cross-field checks need the user's files, so they are left out)."""
    from asr_dist.config import ConfigError, merge_config

    config = None if args.config == ELIDED else str(REPO / args.config)
    assert config is None or Path(config).is_file(), f"{args.config} is not in the repository: {command}"
    try:
        merge_config(config, ["output_dir=elided", *args.overrides])  # the one key without a default
    except ConfigError as e:
        pytest.fail(f"documented command has a wrong override ({e}): {command}")


@pytest.mark.parametrize("command", [c for c in documented_commands() if not c.startswith("make ")])
def test_every_command_parses(command):
    words = words_of(command)
    if words[:2] == ["pip", "install"]:  # an extra this project declares
        extras = re.findall(r"asr-dist\[(\w+)\]", command)
        assert extras and all(re.search(rf"^{e} =", (REPO / "setup.cfg").read_text(), re.M) for e in extras), command
        return
    if words[0] == "bash":
        assert (REPO / words[1]).exists(), words[1]
        return
    if words[0] == "sbatch":  # sbatch [options] slurm/X.sbatch CONFIG [overrides]: the script runs train with them
        # (sbatch's own options are checked by tests/slurm, which submits with them to a real cluster)
        script = next(w for w in words if w.endswith(".sbatch"))
        assert (REPO / script).exists(), script
        rest = words[words.index(script) + 1:]
        args = ["train", "--config", *rest] if "train" in Path(script).name else None
        if args is None:
            return
    elif words[0] == "asr-dist":
        args = words[1:]
    else:  # a launcher: deepspeed / torchrun / python in front of one of our entry scripts
        script = next(w for w in words if w.endswith(".py"))
        assert (REPO / script).exists(), script
        try:
            launcher_parses(words)
        except SystemExit as e:
            pytest.fail(f"documented command's launcher options do not parse ({e}): {command}")
        sub = {"train.py": "train", "evaluate.py": "evaluate", "transcribe.py": "transcribe", "build.py": "shards"}
        name = Path(script).name
        args = ([sub[name]] + (["build"] if name == "build.py" else [])) + words[words.index(script) + 1:]
    try:
        parsed = make_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"documented command does not parse ({e}): {command}")
    if args[0] == "train":
        overrides_fit_the_schema(parsed, command)


def test_a_misspelt_key_or_flag_fails():
    """The checks above catch what they claim: a page with a typo would fail them."""
    with pytest.raises(pytest.fail.Exception, match="wrong override"):
        test_every_command_parses("asr-dist train --config configs/xlsr300m-danish.yaml data.micro_batchsize=4")
    with pytest.raises(pytest.fail.Exception, match="wrong override"):
        test_every_command_parses("sbatch slurm/train.sbatch configs/xlsr300m-danish.yaml data.micro_batch_size=two")
    with pytest.raises(pytest.fail.Exception, match="launcher options"):
        test_every_command_parses("torchrun --nprocs_per_node 8 launch/train.py --config configs/xlsr300m-danish.yaml")
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        test_every_command_parses("asr-dist evaluate --model m --shards s --batchsize 4")


def anchors(page: Path) -> set[str]:
    """The page's headings as GitHub makes them into anchors."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links_in(page: Path) -> list[str]:
    """The relative link targets of a page (outside code blocks)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def broken_links(page: Path) -> list[str]:
    """The page's relative links that name no file of the repository, or no heading of the file they name."""
    broken = []
    for target in links_in(page):
        name, _, anchor = target.partition("#")
        linked = (page.parent / name).resolve() if name else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    return broken


def test_every_link_resolves():
    """Every relative link of the README, docs/ and bench/README.md names a file, and a heading of it where it
    names one."""
    for page in [*PAGES, REPO / "bench" / "README.md"]:
        assert not broken_links(page), f"{page.relative_to(REPO)}: broken links {broken_links(page)}"


def test_a_broken_link_fails(tmp_path):
    """The link check catches what it claims: a missing page and a missing heading, not a web address."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Adding a family\n\n```bash\n# Not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#adding-a-family) [gone](docs/b.md) [bad](docs/a.md#not-a-heading) "
                    "[web](https://example.org/x) [self](#missing)\n\n# Top\n")
    assert broken_links(page) == ["docs/b.md", "docs/a.md#not-a-heading", "#missing"]


def test_every_page_in_docs_is_linked_from_the_readme():
    readme = set(links_in(REPO / "README.md"))
    for page in PAGES[1:]:
        assert any(t.partition("#")[0] == f"docs/{page.name}" for t in readme), f"README.md does not link docs/{page.name}"
