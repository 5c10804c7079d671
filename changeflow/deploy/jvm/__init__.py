"""What the JVM services of the native local stack share: Java, Maven and an install marker.

Kafka, Kafka Connect with Debezium, and the search engine all come from Maven Central as plain jars,
because Maven Central is the only place this project's machines can fetch them from (no tarball
downloads, no Docker). Each service has a POM under ``changeflow/deploy/jvm/<part>/`` that only declares
dependencies; ``mvn dependency:copy-dependencies`` copies the resolved set into the state directory and
the service runs ``java -cp 'lib/*' <main class>``.

An install is recorded by a marker file holding a fingerprint of the POMs and sources it came from, so
a second ``install()`` is a no-op, and editing a POM (a version bump) installs again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from changeflow.deploy.service import ServiceError

JVM_DIR = Path(__file__).resolve().parent
REPO_DIR = JVM_DIR.parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Kafka 4.x, Debezium 3.x and OpenSearch 2.19 all need Java 17 or newer.
MIN_JAVA = 17

# Common JVM flags: fail fast on OOM (a half-dead broker is worse than a dead one), no GUI toolkit.
BASE_JVM_OPTS = [
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=50",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Dfile.encoding=UTF-8",
]


def say(message: str) -> None:
    print(message, flush=True)


def java_home() -> Path | None:
    """The JDK to use: ``JAVA_HOME`` when set (Maven honours it too), else the one on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return Path(home)
    java = shutil.which("java")
    if java:
        return Path(java).resolve().parent.parent
    return None


def java_bin(tool: str = "java") -> str:
    home = java_home()
    if home is None or not (home / "bin" / tool).exists():
        raise ServiceError(
            f"no `{tool}` found: install a JDK {MIN_JAVA}+ (Debian: openjdk-17-jdk-headless) or set JAVA_HOME"
        )
    return str(home / "bin" / tool)


def java_major(java: str | None = None) -> int:
    result = subprocess.run([java or java_bin(), "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        raise ServiceError(f"cannot read the Java version from: {result.stderr.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def check_java() -> None:
    major = java_major()
    if major < MIN_JAVA:
        raise ServiceError(f"Java {major} found; Kafka 4, Debezium 3 and OpenSearch 2.19 need {MIN_JAVA}+")


def fingerprint(paths: Iterable[Path], *extra: str) -> str:
    """A digest of the files (and options) an install came from; the install marker stores it."""
    digest = hashlib.sha256()
    for text in extra:
        digest.update(text.encode())
    for path in sorted(paths):
        digest.update(str(path.relative_to(JVM_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def installed(marker: Path, stamp: str) -> bool:
    try:
        return marker.read_text().strip() == stamp
    except OSError:
        return False


def maven_copy_dependencies(
    pom: Path,
    dest: Path,
    *,
    exclude_group_ids: Sequence[str] = (),
    label: str = "",
) -> int:
    """Resolve ``pom``'s runtime dependencies from Maven Central and copy the jars into ``dest``.

    Copies into a sibling temporary directory first and swaps it in, so an interrupted install never
    leaves a half-filled lib directory behind. Returns the number of jars.
    """
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (`mvn`) is not installed; Debian: apt-get install maven")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-Dstyle.color=never",
        "-f",
        str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
    ]
    if exclude_group_ids:
        cmd.append(f"-DexcludeGroupIds={','.join(exclude_group_ids)}")
    started = time.monotonic()
    shown = pom.relative_to(REPO_DIR) if pom.is_relative_to(REPO_DIR) else pom
    say(f"  resolving {label or pom.parent.name} from Maven Central ({shown})")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=pom.parent)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        output = ANSI.sub("", result.stdout + result.stderr).strip().splitlines()
        # The first [ERROR] lines say what was missing; Maven's closing advice adds nothing here.
        errors: list[str] = []
        for line in output:
            if "To see the full stack trace" in line:
                break
            if line.startswith("[ERROR]") and line.strip() != "[ERROR]":
                errors.append(line)
        raise ServiceError(
            f"Maven failed to resolve {pom} (exit {result.returncode}):\n" + "\n".join((errors or output)[-25:])
        )
    jars = sorted(tmp.glob("*.jar"))
    if not jars:
        raise ServiceError(f"Maven resolved no jars for {pom}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    say(f"  {len(jars)} jars in {dest} ({time.monotonic() - started:.0f}s)")
    return len(jars)


def write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def properties(values: dict[str, object]) -> str:
    """A Java .properties file body; values are written as given (callers avoid backslashes)."""
    return "".join(f"{key}={value}\n" for key, value in values.items())
