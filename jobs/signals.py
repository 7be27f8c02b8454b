def install_demo(sender, **kwargs):
    """After migrate, every user sees the public demo datasets and the demo tokenizer."""
    from .services import install_demo_data

    install_demo_data()
