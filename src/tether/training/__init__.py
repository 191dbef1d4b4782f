"""Training: a thin `transformers.Trainer` subclass, the forgetting guard, and the run driver."""
