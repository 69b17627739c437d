import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(
    r'^__version__ = "([^"]+)"', (here / "histstat" / "__init__.py").read_text(), re.M
).group(1)

setup(
    name="histstat",
    version=version,
    description="History for netstat: network connections as they occur, "
    "with process, user and command line",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["histstat", "histstat.*"]),
    python_requires=">=3.9",
    install_requires=["psutil>=5.9"],
    extras_require={
        "geoip": ["maxminddb>=2"],
        # the tests build their own small GeoIP databases with mmdb-writer
        # and CI checks types and lint with the same install
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "maxminddb>=2",
            "mmdb-writer>=0.2",
            "mypy>=1.8",
            "types-psutil",
            "ruff>=0.4",
        ],
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
