"""Maps the repository's top-level source folders under one `visionloop` namespace.

contracts/, libs/ and services/ stay at the top of the repository where a reader expects
them, but install as visionloop.contracts, visionloop.libs and visionloop.services, so the
distribution never claims a generic top-level import name in site-packages. Everything
else lives in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {
    "visionloop": "visionloop",
    "visionloop.contracts": "contracts",
    "visionloop.libs": "libs",
    "visionloop.services": "services",
}

packages: list[str] = []
for namespace, folder in ROOTS.items():
    packages.append(namespace)
    # Namespace discovery also lists data folders (schemas/, migrations/) so their files ship.
    packages += [
        f"{namespace}.{sub}"
        for sub in find_namespace_packages(folder, exclude=["*__pycache__*"])
    ]

setup(packages=packages, package_dir=ROOTS)
