"""launch_testing description for launch/clip3d.launch.py, run by tests/test_ros_launch.py through
launch_testing's LaunchTestRunner (not collected by pytest itself: launch_testing is no wheel).

The launch file runs from the source tree with AMENT_PREFIX_PATH unset (the caller's
environment); the node gets the checkpoint in $CLIP3D_LAUNCH_TEST_CHECKPOINT. Active test: the
node starts labelling. After shutdown (SIGINT from launch): every process exited with 0.
"""

from __future__ import annotations

import importlib.util
import os
import unittest
from pathlib import Path

import launch_testing
import launch_testing.actions
import launch_testing.asserts

from launch import LaunchDescription

LAUNCH = Path(__file__).resolve().parents[2] / "launch" / "clip3d.launch.py"


def generate_test_description() -> LaunchDescription:
    spec = importlib.util.spec_from_file_location("clip3d_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from launch.actions import SetLaunchConfiguration

    return LaunchDescription(
        [
            SetLaunchConfiguration("checkpoint", os.environ["CLIP3D_LAUNCH_TEST_CHECKPOINT"]),
            *module.generate_launch_description().entities,
            launch_testing.actions.ReadyToTest(),
        ]
    )


class TestNodeStarts(unittest.TestCase):
    def test_node_labels(self, proc_output) -> None:
        proc_output.assertWaitFor("labelling", timeout=120)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code_zero(self, proc_info) -> None:
        launch_testing.asserts.assertExitCodes(proc_info)
