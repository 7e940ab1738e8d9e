"""Training jobs: data -> model -> fit -> evaluate -> bless -> export -> push."""
