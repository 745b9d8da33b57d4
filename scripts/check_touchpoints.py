"""Check ``VLLM_TOUCHPOINTS`` against another vLLM's Python sources, without importing that vLLM.

Reads the ``.py`` files of a vLLM wheel (or of an installed ``vllm`` package directory) with
``zipfile`` and ``ast`` and, for every touchpoint, reports whether its module and qualified name
still exist (a class member may be a method, a class attribute, an enum member, a field or an
attribute set as ``self.<name>`` in a method; base classes are followed) and whether the leading
parameters we rely on still match. With a baseline (the vLLM we were checked against) it also
reports every touched callable whose full parameter list changed.

Status per touchpoint: ``ok``; ``MISSING`` (module or name not found); ``PARAMS`` (the leading
parameters we rely on differ); ``SIGNATURE`` (leading parameters match, but the parameter list
differs from the baseline's, e.g. a new trailing parameter that a wrapper must pass through);
``KIND`` (a function became something else or the reverse).

    python scripts/check_touchpoints.py 0.33.0 0.34.0             # wheels from the cache
    python scripts/check_touchpoints.py --download 0.34.0          # pip download into the cache
    python scripts/check_touchpoints.py --baseline installed path/to/vllm-0.34.0-*.whl

A version names ``vllm==<version>`` from PyPI, kept in ``$MADAKV_WHEEL_CACHE`` (default
``~/.cache/madakv-vllm/wheels``); ``installed`` names the vLLM installed here (read as files).
The default baseline is the vLLM release the touchpoints were checked against.
"""

import argparse
import ast
import glob
import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --- sources ---------------------------------------------------------------------------------


class Source:
    """The ``vllm`` package's Python files, from a wheel or a directory holding ``vllm/``."""

    def __init__(self, location: str | os.PathLike, label: str | None = None) -> None:
        self.location = Path(location)
        self.label = label or self.location.name
        self._zip = zipfile.ZipFile(self.location) if self.location.is_file() else None
        self._names = set(self._zip.namelist()) if self._zip else None
        self._trees: dict[str, ast.Module | None] = {}

    def _read(self, path: str) -> str | None:
        if self._zip is not None:
            return self._zip.read(path).decode("utf-8") if path in self._names else None
        p = self.location / path
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def module_path(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for path in (f"{base}.py", f"{base}/__init__.py"):
            if self._read(path) is not None:
                return path
        return None

    def is_package(self, module: str) -> bool:
        return (self.module_path(module) or "").endswith("/__init__.py")

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.module_path(module)
            self._trees[module] = None if path is None else ast.parse(self._read(path), path)
        return self._trees[module]

    def version(self) -> str:
        """The version the sources declare (``vllm/_version.py``), or '?'."""
        text = self._read("vllm/_version.py") or ""
        for node in ast.walk(ast.parse(text)) if text else ():
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("__version__", "version")
                                                    for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    return str(node.value.value)
        return "?"


def installed_vllm_dir() -> Path | None:
    """The directory holding the installed ``vllm`` package (found without importing it)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).parent


def wheel_cache() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "madakv-vllm" / "wheels"
    return Path(os.environ.get("MADAKV_WHEEL_CACHE", default))


def cached_wheel(version: str, cache: Path | None = None) -> Path | None:
    found = sorted(glob.glob(str((cache or wheel_cache()) / f"vllm-{version}-*.whl")))
    return Path(found[0]) if found else None


def download_wheel(version: str, cache: Path | None = None, timeout: float = 1800) -> Path:
    """``pip download --no-deps vllm==<version>`` into the cache (a few hundred MB); raises
    RuntimeError naming pip's last lines if that fails (e.g. offline)."""
    cache = cache or wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(cache), f"vllm=={version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"pip download vllm=={version} failed: {e}") from None
    wheel = cached_wheel(version, cache)
    if proc.returncode or wheel is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise RuntimeError(f"pip download vllm=={version} failed (exit {proc.returncode}): {tail}")
    return wheel


def open_source(spec: str, download: bool = False) -> Source:
    """A wheel path, a directory holding ``vllm/``, ``installed``, or a version (cached wheel)."""
    if spec == "installed":
        where = installed_vllm_dir()
        if where is None:
            raise RuntimeError("vllm is not installed here")
        return Source(where, "installed")
    if os.path.exists(spec):
        return Source(spec)
    wheel = cached_wheel(spec) or (download_wheel(spec) if download else None)
    if wheel is None:
        raise RuntimeError(f"no cached wheel for vllm=={spec} in {wheel_cache()} (pass --download)")
    return Source(wheel, spec)


# --- resolving a touchpoint ------------------------------------------------------------------


@dataclass
class Found:
    kind: str  # "module" | "class" | "function" | "property" | "attribute"
    module: str  # where it is defined
    node: ast.AST | None = None


def _statements(body):
    """Statements of a module or class body, looking inside if/try/with blocks (not functions)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _statements(block)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)


def _targets(node) -> list[str]:
    if isinstance(node, ast.Assign):
        out = []
        for t in node.targets:
            out += [e.id for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)]
        return out
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _is_overload(fn) -> bool:
    return any(getattr(d, "id", getattr(d, "attr", None)) == "overload" for d in fn.decorator_list)


def _def_kind(fn) -> str:
    names = {getattr(d, "id", getattr(d, "attr", None)) for d in fn.decorator_list}
    return "property" if names & {"property", "cached_property", "DynamicClassAttribute"} else "function"


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


class Resolver:
    def __init__(self, src: Source) -> None:
        self.src = src

    def lookup(self, module: str, name: str, depth: int = 0) -> Found | None:
        """``name`` in ``module``'s namespace: defined there, imported into it, or a submodule."""
        tree = self.src.tree(module)
        if tree is None or depth > 8:
            return None
        found = None
        for node in _statements(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                if not _is_overload(node):
                    found = Found(_def_kind(node), module, node)
            elif isinstance(node, ast.ClassDef) and node.name == name:
                found = Found("class", module, node)
            elif name in _targets(node) and found is None:
                found = Found("attribute", module, node)
            elif isinstance(node, ast.ImportFrom) and found is None:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        origin = _absolute(module, self.src.is_package(module), node)
                        found = (self.lookup(origin, alias.name, depth + 1)
                                 or self._module(f"{origin}.{alias.name}"))
            elif isinstance(node, ast.Import) and found is None:
                for alias in node.names:
                    if alias.asname == name:
                        found = self._module(alias.name)
        return found or self._module(f"{module}.{name}")

    def _module(self, module: str) -> Found | None:
        return Found("module", module) if self.src.tree(module) is not None else None

    def member(self, cls: Found, name: str, depth: int = 0) -> Found | None:
        """``name`` on class ``cls``: in its body, set as ``self.<name>`` in a method, or inherited."""
        if depth > 12:
            return None
        body = list(_statements(cls.node.body))
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                if not _is_overload(node):
                    found = Found(_def_kind(node), cls.module, node)
            elif isinstance(node, ast.ClassDef) and node.name == name:
                found = Found("class", cls.module, node)
            elif name in _targets(node) and found is None:
                found = Found("attribute", cls.module, node)
        if found:
            return found
        for fn in (n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                targets = (node.targets if isinstance(node, ast.Assign)
                           else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
                for t in targets:
                    if (isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                            and t.value.id == "self"):
                        return Found("attribute", cls.module, node)
        for base in cls.node.bases:
            base_cls = self._expr(cls.module, base)
            if base_cls is not None and base_cls.kind == "class":
                found = self.member(base_cls, name, depth + 1)
                if found:
                    return found
        return None

    def _expr(self, module: str, expr) -> Found | None:
        if isinstance(expr, ast.Subscript):  # Generic[T], Builder[M]
            return self._expr(module, expr.value)
        if isinstance(expr, ast.Name):
            return self.lookup(module, expr.id)
        if isinstance(expr, ast.Attribute):
            owner = self._expr(module, expr.value)
            if owner is None:
                return None
            if owner.kind == "module":
                return self.lookup(owner.module, expr.attr)
            if owner.kind == "class":
                return self.member(owner, expr.attr)
        return None

    def resolve(self, module: str, qualname: str) -> tuple[Found | None, str]:
        """(what ``module.qualname`` is, or None; what was not found)."""
        if self.src.tree(module) is None:
            return None, f"module {module} not found"
        obj = Found("module", module)
        for i, part in enumerate(qualname.split(".")):
            where = ".".join(qualname.split(".")[:i]) or module
            if obj.kind == "module":
                obj = self.lookup(obj.module, part)
            elif obj.kind == "class":
                obj = self.member(obj, part)
            else:
                obj = None
            if obj is None:
                return None, f"{part} not found in {where}"
        return obj, ""


def parameters(fn) -> list[str]:
    """Parameter names in order, as inspect.signature lists them (``*args``/``**kw`` marked)."""
    a = fn.args
    return ([p.arg for p in a.posonlyargs + a.args] + ([f"*{a.vararg.arg}"] if a.vararg else [])
            + [p.arg for p in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else []))


# --- the check ---------------------------------------------------------------------------------


@dataclass
class Result:
    touchpoint: object
    status: str  # ok | MISSING | PARAMS | SIGNATURE | KIND
    detail: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.touchpoint.module, self.touchpoint.qualname


def check(touchpoints, target: Source, baseline: Source | None = None) -> list[Result]:
    tgt, base = Resolver(target), Resolver(baseline) if baseline is not None else None
    results = []
    for t in touchpoints:
        found, why = tgt.resolve(t.module, t.qualname)
        if found is None:
            results.append(Result(t, "MISSING", why))
            continue
        is_fn = found.kind == "function"
        got = parameters(found.node) if is_fn else None
        if t.params is not None:
            if not is_fn:
                results.append(Result(t, "KIND", f"a {found.kind}, not a function"))
                continue
            if [p.lstrip("*") for p in got[: len(t.params)]] != list(t.params):
                results.append(Result(t, "PARAMS", f"({', '.join(got)}), we rely on ({', '.join(t.params)})"))
                continue
        before = base.resolve(t.module, t.qualname)[0] if base is not None else None
        if before is not None:
            was_fn = before.kind == "function"
            if was_fn != is_fn:
                results.append(Result(t, "KIND", f"was a {before.kind}, now a {found.kind}"))
                continue
            if is_fn and parameters(before.node) != got:
                old = parameters(before.node)
                added = [p for p in got if p not in old]
                removed = [p for p in old if p not in got]
                change = ", ".join([f"+{p}" for p in added] + [f"-{p}" for p in removed]) or "reordered"
                shown = ", ".join(got) if len(got) <= 8 else ", ".join(got[:3] + ["...", *got[-3:]])
                results.append(Result(t, "SIGNATURE", f"{change} ({shown})"))
                continue
        results.append(Result(t, "ok"))
    return results


def differences(results: list[Result]) -> dict[tuple[str, str], str]:
    """{(module, qualname): status} of every touchpoint that is not ok."""
    return {r.key: r.status for r in results if r.status != "ok"}


def locate(src: Source, module: str, qualname: str) -> list[str] | str | None:
    """The parameters of ``module.qualname`` in ``src`` (a function), its kind (else), or None."""
    found, _ = Resolver(src).resolve(module, qualname)
    if found is None:
        return None
    return parameters(found.node) if found.kind == "function" else found.kind


def table(results: list[Result], all_rows: bool = False) -> str:
    rows = [(i, r) for i, r in enumerate(results, 1) if all_rows or r.status != "ok"]
    lines = ["| # | module | qualname | kind | status | detail |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r.touchpoint.module} | {r.touchpoint.qualname} | {r.touchpoint.kind} | {r.status} | "
              f"{r.detail} |" for i, r in rows]
    return "\n".join(lines)


def touchpoints(include_cuda: bool = True) -> list:
    sys.path.insert(0, str(ROOT))
    from madakv_vllm.integration import VLLM_CUDA_TOUCHPOINTS, VLLM_TOUCHPOINTS

    return list(VLLM_TOUCHPOINTS) + (list(VLLM_CUDA_TOUCHPOINTS) if include_cuda else [])


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from madakv_vllm.integration import VLLM_VERSION_CHECKED

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="+", help="versions (cached or --download), wheels, directories, 'installed'")
    p.add_argument("--baseline", default=VLLM_VERSION_CHECKED,
                   help=f"the vLLM the touchpoints were checked against (default {VLLM_VERSION_CHECKED}); "
                        "'none' for none")
    p.add_argument("--download", action="store_true", help="pip download wheels missing from the cache")
    p.add_argument("--all", action="store_true", help="print every touchpoint, not only the differences")
    args = p.parse_args(argv)
    baseline = None if args.baseline == "none" else open_source(args.baseline, args.download)
    for spec in args.targets:
        src = open_source(spec, args.download)
        results = check(touchpoints(), src, baseline)
        n = sum(r.status != "ok" for r in results)
        print(f"## vLLM {src.version()} ({src.label}) against "
              f"{'no baseline' if baseline is None else f'{baseline.version()} ({baseline.label})'}: "
              f"{n} of {len(results)} touchpoints differ\n")
        print(table(results, args.all) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
