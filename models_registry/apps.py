from django.apps import AppConfig
from django.db.models.signals import post_migrate
from django.utils.translation import gettext_lazy as _


def install_demo(sender, **kwargs):
    """After migrate, every user sees the public demo datasets and the demo tokenizer."""
    from .services import install_demo_data

    install_demo_data()


class ModelsRegistryConfig(AppConfig):
    name = "models_registry"
    verbose_name = _("Model registry")

    def ready(self):
        post_migrate.connect(install_demo, sender=self)
