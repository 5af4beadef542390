"""The shape of compress_gptoss.py, read from its source and its parser (fast: nothing runs).

- Sections in data-flow order, each command's options dataclass, add_*_parser and cmd_* together in
  its own section, and every llmcompressor / compressed-tensors patch in the patches section.
- Each command's options dataclass has exactly its subparser's flags (by dest), so the two cannot
  drift, and it is frozen.
- The argparse Namespace stops at cmd_*: no other function has a parameter named `args`.
- No function over 150 lines (a Triton kernel body that cannot be split would be named below).
- No backslash line continuation, in code or inside a string.
- Tests and benches use only public names of compress_gptoss.
"""
import argparse
import ast
import dataclasses
import io
import re
import tokenize
from pathlib import Path

import pytest

import compress_gptoss as cg

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(cg.__file__).read_text()
TREE = ast.parse(SOURCE)

SECTIONS = ["Foundations", "MXFP4 codec", "dequantize", "llmcompressor / compressed-tensors patches", "quantize",
            "Loader + quality", "Kernel library", "verify-runtime", "install-kernel", "main"]
# (section, options dataclass, add_*_parser, cmd_*)
COMMANDS = [("dequantize", cg.DequantizeOptions, cg.add_dequantize_parser, cg.cmd_dequantize),
            ("quantize", cg.QuantizeOptions, cg.add_quantize_parser, cg.cmd_quantize),
            ("install-kernel", cg.InstallKernelOptions, cg.add_install_kernel_parser, cg.cmd_install_kernel),
            ("verify-runtime", cg.VerifyRuntimeOptions, cg.add_verify_runtime_parser, cg.cmd_verify_runtime)]
# Functions that read the Namespace besides cmd_* and main: the one place that turns it into options.
NAMESPACE_READERS = {"main", "CommandOptions.from_args"}
# Parameters named `args` whose name an upstream protocol fixes (not a Namespace).
UPSTREAM_SIGNATURES = {"vllm_probe.ReadRecorder.__torch_dispatch__"}   # torch's TorchDispatchMode
MAX_FUNCTION_LINES = 150
# A Triton kernel body longer than MAX_FUNCTION_LINES that cannot be split goes here, with why.
LONG_KERNEL_BODIES: dict[str, str] = {}


def functions(tree=TREE):
    """(qualified name, node) of every function, methods and nested functions included."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    yield name, child
                yield from walk(child, name + ".")
            else:
                yield from walk(child, prefix)
    return list(walk(tree, ""))


def section_starts() -> list[tuple[int, str]]:
    """(line, name) of each `##### N. name #####` banner, numbered 1, 2, ... in order."""
    found = [(SOURCE[:m.start()].count("\n") + 1, int(m[1]), m[2])
             for m in re.finditer(r"^##### (\d+)\. (.+?) #####$", SOURCE, re.M)]
    assert [n for _, n, _ in found] == list(range(1, len(found) + 1)), found
    return [(line, name) for line, _, name in found]


def section_of(line: int) -> str:
    return [name for start, name in section_starts() if start <= line][-1]


def top_level_line(name: str) -> int:
    return next(n.lineno for n in TREE.body if getattr(n, "name", None) == name)


def test_sections_in_data_flow_order():
    names = [name for _, name in section_starts()]
    assert len(names) == len(SECTIONS)
    for name, expected in zip(names, SECTIONS):
        assert name.startswith(expected), (name, expected)


@pytest.mark.parametrize("section, options, add_parser, cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_each_command_lives_in_its_section(section, options, add_parser, cmd):
    lines = [top_level_line(f.__name__) for f in (options, add_parser, cmd)]
    assert lines == sorted(lines), "options dataclass, then add_*_parser, then cmd_*"
    assert {section_of(line) for line in lines} == {section}


@pytest.mark.parametrize("section, options, add_parser, cmd", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_options_fields_are_the_subparsers_dests(section, options, add_parser, cmd):
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    args = parser.parse_args([])
    assert args.func is cmd
    dests = set(vars(args)) - {"func"}
    fields = [f.name for f in dataclasses.fields(options)]
    assert sorted(fields) == sorted(dests)
    opts = options.from_args(args)
    assert all(getattr(opts, f) == getattr(args, f) for f in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, fields[0], None)


def test_build_parser_composes_the_four_commands():
    parser = cg.build_parser()
    for _, options, _, cmd in COMMANDS:
        name = cmd.__name__[len("cmd_"):].replace("_", "-")
        assert parser.parse_args([name]).func is cmd


def test_the_namespace_stops_at_cmd():
    takers = [name for name, f in functions()
              if "args" in [a.arg for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs]]
    assert takers, "the walk found no function at all"
    others = [name for name in takers if not name.startswith("cmd_") and name not in NAMESPACE_READERS
              and name not in UPSTREAM_SIGNATURES]
    assert not others, f"these take `args` (the Namespace stops at cmd_*): {others}"
    assert UPSTREAM_SIGNATURES <= set(takers), "an allow-listed upstream signature is gone: drop it here"


def test_no_function_over_150_lines():
    long = {name: f.end_lineno - f.lineno + 1 for name, f in functions()
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert set(long) <= set(LONG_KERNEL_BODIES), f"over {MAX_FUNCTION_LINES} lines: {long}"
    assert set(LONG_KERNEL_BODIES) <= set(long), "an allow-listed kernel body is short now: drop it here"


def backslash_continuations(source: str) -> list[int]:
    """Lines that end in a line continuation: a `\\` outside any string, or an odd run of them inside
    a string that is not raw (there it joins two lines of the text)."""
    in_string: dict[int, bool] = {}        # line -> inside a raw string (the last line of a string excluded)
    open_fstring = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        name = tokenize.tok_name[tok.type]
        if name == "FSTRING_START":                           # Python >= 3.12 splits f-strings up
            open_fstring.append(tok)
            continue
        if name == "FSTRING_END":
            start = open_fstring.pop()
            raw, first = "r" in start.string.lower(), start.start[0]
        elif tok.type == tokenize.STRING and not open_fstring:
            prefix = tok.string[:len(tok.string) - len(tok.string.lstrip("rRbBuUfF"))]
            raw, first = "r" in prefix.lower(), tok.start[0]
        else:
            continue
        for line in range(first, tok.end[0]):
            in_string[line] = raw
    out = []
    for no, text in enumerate(source.splitlines(), 1):
        trailing = len(text) - len(text.rstrip("\\"))
        if no in in_string:
            if trailing % 2 and not in_string[no]:
                out.append(no)
        elif trailing:
            out.append(no)
    return out


def test_backslash_continuation_finder():
    code = ('x = 1 + \\\n    2\ns = """a\\\nb"""\nt = """c\\\\\nd"""\nr = r"""e\\\nf"""\ny = f"""{x}\\\ng"""\n')
    assert backslash_continuations(code) == [1, 3, 9]


def test_no_backslash_continuations():
    assert backslash_continuations(SOURCE) == []


def test_every_patch_is_in_the_patches_section():
    calls = [node.lineno for node in ast.walk(TREE) if isinstance(node, ast.Call)
             and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == "patch_attr"]
    assert calls
    assert {section_of(line) for line in calls} == {"llmcompressor / compressed-tensors patches"}


def test_tests_and_benches_use_public_names_only():
    """`import compress_gptoss as X` (or `import compress_gptoss`) then X._name, or `from
    compress_gptoss import _name`: a private name that a test or bench reads would pin it."""
    found = []
    for path in sorted(list((ROOT / "tests").glob("*.py")) + list((ROOT / "bench").glob("*.py"))):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name == "compress_gptoss"}
            elif isinstance(node, ast.ImportFrom) and node.module == "compress_gptoss":
                found += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, found
