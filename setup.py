"""Shim for colcon's ament_python build; the package metadata lives in pyproject.toml.

It adds what ament needs on top of the pip package: the package marker in the ament index, and
package.xml, the launch file and the config files under share/clip3d_ros.
"""

from glob import glob

from setuptools import setup
from setuptools.dist import Distribution

PACKAGE = "clip3d_ros"


class _ColconDistribution(Distribution):
    """colcon reads the package metadata as the `repr` of this object through `ast.literal_eval`:
    `requires-python` from pyproject.toml arrives as a packaging `SpecifierSet`, which it cannot
    parse; setuptools accepts (and itself validates) the plain string."""

    def parse_config_files(self, *args, **kwargs):
        super().parse_config_files(*args, **kwargs)
        for holder in (self, self.metadata):
            if getattr(holder, "python_requires", None) is not None:
                holder.python_requires = str(holder.python_requires)


setup(
    distclass=_ColconDistribution,
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        # pyproject.toml (the metadata) and the README it names are listed so that
        # `colcon build --symlink-install`, which links only setup.py, setup.cfg, packages and data
        # files into build/, finds them there; installed, they are harmless documentation.
        (f"share/{PACKAGE}", ["package.xml", "pyproject.toml", "README.md"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        # the demo's training configs (clip3d_ros.demo.config.shipped_file finds them when installed)
        (
            f"share/{PACKAGE}/training",
            ["training/synthetic_tiny.yaml", "training/synthetic_panoptic_demo.yaml"],
        ),
        (
            f"share/{PACKAGE}/config",
            glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz") + glob("config/*.json"),
        ),
    ],
)
