"""First-party plugin: the zoo models and detectors for public BNN families.

Registered through the ``bnnshift.plugins`` entry point exactly as a third-party plugin is.
"""


def register(api) -> None:
    from . import detectors, models  # noqa: F401  (importing registers)

    models.register_all(api)
    detectors.register_all(api)
