#!/usr/bin/env bash
# Replays the Dockerfile's build stage on this machine, without a Docker engine: the build
# context is copied as `docker build` would send it (.dockerignore applied), each COPY lays it
# out as the Dockerfile says, each RUN runs with `sh -c` in the stage's WORKDIR, and finally
# every file the runtime stage copies out of the build stage must exist. A COPY that forgets
# something the build needs (as when only Cargo.toml was copied and the benches were missing)
# fails here as it would in `docker build`.
#
#   scripts/docker-replay.sh                    # TARGETPLATFORM=linux/amd64, PROFILE=release
#   TARGETPLATFORM=linux/arm64 scripts/docker-replay.sh
#
# Paths: the stage's absolute paths (/src, ...) are mapped into a scratch directory under /tmp,
# removed afterwards; cache mounts persist in target/docker-replay between runs, as BuildKit's do.
# The base image is this machine (Debian bookworm with rustup, like rust:1-bookworm).
# Not replayed: the base images themselves, the runtime stage's COPY --chown/--chmod effects.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

ROOT = os.getcwd()
WORK = os.path.join(ROOT, "target", "docker-replay")  # persistent cache mounts
# Outside the project, so that cargo finds no .cargo/config.toml or manifest above the stage's
# files that the image would not have.
SCRATCH = tempfile.mkdtemp(prefix="mlb-docker-replay.")
FS = os.path.join(SCRATCH, "root")          # the build stage's filesystem, where it differs
CONTEXT = os.path.join(SCRATCH, "context")  # what `docker build .` sends
STAGE = os.environ.get("REPLAY_STAGE", "builder")
DOCKERFILE = os.environ.get("REPLAY_DOCKERFILE", "Dockerfile")
BUILD_ARGS = {
    "TARGETPLATFORM": os.environ.get("TARGETPLATFORM", "linux/amd64"),
    "BUILDPLATFORM": "linux/amd64",
}
if "PROFILE" in os.environ:
    BUILD_ARGS["PROFILE"] = os.environ["PROFILE"]


def fail(message):
    print(f"docker-replay: {message}", file=sys.stderr)
    sys.exit(1)


def instructions(path):
    """(keyword, arguments) per instruction, continuation lines joined, comments dropped."""
    out, current = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if current and line.lstrip().startswith("#"):
                continue  # comments inside a continued instruction
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            current += line
            keyword, _, rest = current.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            current = ""
    return out


def ignore_patterns():
    patterns = []
    try:
        with open(".dockerignore", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                negate = line.startswith("!")
                pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
                patterns.append((negate, pattern))
    except FileNotFoundError:
        pass
    return patterns


def pattern_matches(pattern, path):
    """Docker's rule: the pattern matches the path or one of its parent directories."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex += "(.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            regex += ".*"
            i += 2
        elif pattern[i] == "*":
            regex += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            regex += "[^/]"
            i += 1
        else:
            regex += re.escape(pattern[i])
            i += 1
    compiled = re.compile(regex + r"\Z")
    parts = path.split("/")
    return any(compiled.match("/".join(parts[:n])) for n in range(1, len(parts) + 1))


def excluded(path, patterns):
    result = False
    for negate, pattern in patterns:
        if pattern_matches(pattern, path):
            result = not negate
    return result


def make_context():
    os.makedirs(CONTEXT)
    patterns = ignore_patterns()
    # What a clean clone has: the committed files (untracked but unignored ones too, as docker
    # build would send them from a working copy).
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True, capture_output=True,
    ).stdout.decode().split("\0")
    count = 0
    for rel in filter(None, listed):
        if not os.path.lexists(rel) or excluded(rel, patterns):
            continue
        dest = os.path.join(CONTEXT, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(rel, dest, follow_symlinks=False)
        count += 1
    print(f"docker-replay: build context: {count} files after .dockerignore")


def in_fs(path, workdir):
    """Where a stage path lives in the replay's filesystem."""
    absolute = path if path.startswith("/") else os.path.join(workdir, path)
    return os.path.join(FS, os.path.normpath(absolute).lstrip("/"))


def expand(text, env):
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text)


def copy_into(sources, dest, workdir):
    target = in_fs(dest, workdir)
    for source in sources:
        src = os.path.normpath(os.path.join(CONTEXT, source))
        if not src.startswith(CONTEXT):
            fail(f"COPY {source}: outside the build context")
        if not os.path.exists(src):
            fail(f"COPY {source}: not in the build context (see .dockerignore)")
        if os.path.isdir(src):
            # COPY of a directory copies its contents.
            shutil.copytree(src, target, dirs_exist_ok=True, symlinks=True)
        else:
            if dest.endswith("/") or len(sources) > 1:
                os.makedirs(target, exist_ok=True)
                shutil.copy2(src, os.path.join(target, os.path.basename(src)))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(src, target)


def replay():
    steps = instructions(DOCKERFILE)
    stages, current = {}, None
    for keyword, rest in steps:
        if keyword == "FROM":
            words = rest.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else None
            current = name or f"stage{len(stages)}"
            stages[current] = []
        elif current is not None:
            stages[current].append((keyword, rest))
    if STAGE not in stages:
        fail(f"no stage named {STAGE} in the Dockerfile")

    # The build stage's workdir, cleared, except the cache mounts' persistent contents.
    workdir = "/"
    env = dict(os.environ)
    env.update(BUILD_ARGS)
    shutil.rmtree(os.path.join(FS, "src"), ignore_errors=True)
    for keyword, rest in stages[STAGE]:
        if keyword == "ARG":
            name, has_default, default = rest.partition("=")
            if name not in BUILD_ARGS:
                env[name] = default if has_default else env.get(name, "")
            print(f"docker-replay: ARG {name}={env[name]}")
        elif keyword == "ENV":
            name, _, value = rest.partition("=")
            env[name.strip()] = expand(value.strip(), env)
        elif keyword == "WORKDIR":
            workdir = os.path.join(workdir, expand(rest, env))
            os.makedirs(in_fs(workdir, "/"), exist_ok=True)
        elif keyword == "COPY":
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                fail("COPY --from in the build stage is not replayed")
            args = [w for w in words if not w.startswith("--")]
            print(f"docker-replay: COPY {' '.join(args)}")
            copy_into(args[:-1], args[-1], workdir)
        elif keyword == "RUN":
            command = rest
            mounts = []
            while command.startswith("--"):
                flag, _, command = command.partition(" ")
                command = command.lstrip()
                if flag.startswith("--mount="):
                    options = dict(
                        item.partition("=")[::2] for item in flag[len("--mount="):].split(",")
                    )
                    if options.get("type") == "cache":
                        mounts.append(options["target"])
            # A cache mount's target maps to a persistent directory under the replay root,
            # except the toolchain's own registry, which stays the machine's.
            shell_env = dict(env)
            shell_env.pop("CARGO_TARGET_DIR", None)
            for mount in mounts:
                if mount.startswith("/usr/local/cargo"):
                    continue
                cache = os.path.join(WORK, "cache", mount.strip("/").replace("/", "_"))
                os.makedirs(cache, exist_ok=True)
                link = in_fs(mount, "/")
                if os.path.islink(link):
                    os.unlink(link)
                elif os.path.isdir(link):
                    shutil.rmtree(link)
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(cache, link)
            cwd = in_fs(workdir, "/")
            print(f"docker-replay: RUN (in {workdir}) {command[:100]}...", flush=True)
            result = subprocess.run(["sh", "-c", command], cwd=cwd, env=shell_env)
            if result.returncode != 0:
                fail(f"RUN failed with exit code {result.returncode}: {command[:200]}")
        elif keyword in ("LABEL", "SHELL", "USER", "EXPOSE"):
            fail(f"{keyword} in the build stage is not replayed; extend docker-replay.sh")

    # Everything the other stages copy out of this one must now exist.
    for name, stage_steps in stages.items():
        for keyword, rest in stage_steps:
            if keyword != "COPY" or f"--from={STAGE}" not in rest:
                continue
            args = [w for w in shlex.split(rest) if not w.startswith("--")]
            for source in args[:-1]:
                if source.startswith("/etc/ssl/"):
                    present = os.path.exists(source)  # from the base image: this machine's
                else:
                    present = os.path.exists(in_fs(source, "/"))
                if not present:
                    fail(f"stage {name}: COPY --from={STAGE} {source}: the build stage has no such file")
                print(f"docker-replay: stage {name} copies {source}: present")
    print("docker-replay: the build stage builds from this context")


try:
    make_context()
    replay()
finally:
    shutil.rmtree(SCRATCH, ignore_errors=True)
PY
