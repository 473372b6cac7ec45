"""Installing fewstep-policy alone: its module, core as its dependency, the namespace."""

from fewstep.core.testing import check_domain_package


def test_package_installs_on_core():
    check_domain_package("policy")
