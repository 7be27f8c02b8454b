"""django-q2 entry points only (thin): tokenizer training in the background."""
from . import services


def train_tokenizer(tokenizer_id):
    services.train_tokenizer_now(tokenizer_id)
