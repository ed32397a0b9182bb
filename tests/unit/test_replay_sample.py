from collections import Counter

from distill_ray.serve.replay import replay_sample


def test_replay_sample_is_the_same_subset_every_run_and_keeps_the_mix():
    prompts = [{"id": f"p{i}", "category": "shipping" if i % 4 else "refund"} for i in range(400)]
    sample = replay_sample(prompts, 100)
    assert len(sample) == 100 and len({p["id"] for p in sample}) == 100
    assert sample == replay_sample(list(reversed(prompts)), 100)  # by id, not by order
    mix = Counter(p["category"] for p in sample)
    assert 15 <= mix["refund"] <= 35  # a quarter of the prompts, give or take
    assert replay_sample(prompts, None) == prompts and replay_sample(prompts, 1000) == prompts
