"""Shim for colcon's ament_python build; the package metadata lives in pyproject.toml.

It adds what ament needs on top of the pip package: the package marker in the ament index, and
package.xml, the launch file and the config files under share/clip3d_ros.
"""

from glob import glob

from setuptools import setup

PACKAGE = "clip3d_ros"

setup(
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
)
