import torch

from rome.templates import generate_templates, template_groups

LENGTHS = [[5, 3], [4, 2]]


def test_templates_follow_the_seed_not_the_global_random_state(tiny):
    # Sampling draws from a CPU generator seeded by --seed: the global (device) RNG, which differs
    # between CPU and CUDA for one seed, plays no part.
    torch.manual_seed(123)
    first = generate_templates(tiny, LENGTHS, seed=0)
    torch.manual_seed(456)
    torch.rand(1000)
    assert generate_templates(tiny, LENGTHS, seed=0) == first
    assert generate_templates(tiny, LENGTHS, seed=1) != first
    assert first[0] == "{}" and len(first) == 1 + 3 + 2
    assert all(t.endswith(". {}") and t.count("{") == 1 for t in first[1:])


def test_every_draw_comes_from_a_cpu_generator(tiny, monkeypatch):
    # On CUDA, a draw without a generator uses the device's RNG (another stream than the CPU's for
    # the same seed). Every draw of template sampling must name a CPU generator, on CPU tensors.
    draws = []
    multinomial = torch.multinomial

    def checked(probs, num_samples, *args, generator=None, **kw):
        draws.append((probs.device.type, None if generator is None else generator.device.type))
        return multinomial(probs, num_samples, *args, generator=generator, **kw)

    monkeypatch.setattr(torch, "multinomial", checked)
    generate_templates(tiny, LENGTHS, seed=0)
    assert draws and set(draws) == {("cpu", "cpu")}


def test_template_groups_are_the_bare_prompt_then_one_per_length():
    assert template_groups(LENGTHS, "template_groups") == [1, 3, 2]
    assert template_groups(LENGTHS, "templates") == [6]
