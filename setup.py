import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(
    r'^__version__ = "([^"]+)"', (here / "histstat" / "__init__.py").read_text(), re.M
).group(1)

# What tools/generate.py makes the man page and the completion scripts with. Pinned: their
# output is checked in, and another version may write it differently (upgrade here, then
# run python tools/generate.py). Neither is needed at run time.
GENERATORS = ["argparse-manpage==4.8", "shtab==1.13.0"]

setup(
    name="histstat",
    version=version,
    description="History for netstat: network connections as they occur, "
    "with process, user and command line",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["histstat", "histstat.*"]),
    package_data={"histstat.completions": ["histstat.bash", "_histstat"]},
    # beside the venv's bin/, where man finds it for the commands on PATH
    data_files=[("share/man/man1", ["man/histstat.1"])],
    python_requires=">=3.9",
    install_requires=["psutil>=5.9"],
    extras_require={
        "geoip": ["maxminddb>=2"],
        # the tests build their own small GeoIP databases with mmdb-writer, check the
        # Community IDs of --ecs against the reference implementation (communityid),
        # check that the files the generators make are current, and install histstat
        # offline (setuptools and wheel: a venv of Python 3.12 or newer has neither); CI
        # checks types and lint with the same install
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "maxminddb>=2",
            "mmdb-writer>=0.2",
            "communityid>=1.5",
            "mypy>=1.8",
            "types-psutil",
            "ruff>=0.4",
            *GENERATORS,
            "setuptools>=61",
            "wheel",
        ],
        "dev": GENERATORS,
    },
    entry_points={"console_scripts": ["histstat = histstat.runner:main"]},
    classifiers=[
        "Environment :: Console",
        "Intended Audience :: System Administrators",
        "License :: OSI Approved :: MIT License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking :: Monitoring",
        "Topic :: Security",
    ],
)
