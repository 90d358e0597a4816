"""One eval model shared by threads, as a server runs it: each thread's outputs equal the serial
run's bitwise, and each layer's cache of eval RS-Win orders (the FIXED_ORDER_CACHE_SIZE most
recent sizes) holds samplers.fixed_rs_index's orders and no more than its size after threads
added and dropped sizes at once."""
import random
import threading

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import models, modules, samplers
from rsir_kernels.backends import get as get_backend

THREADS = 4


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_threads_sharing_one_eval_model_get_the_serial_outputs(backend):
    if get_backend(backend).unavailable is not None:
        pytest.skip(f"{backend}: {get_backend(backend).unavailable}")
    torch.manual_seed(0)
    model = models.rsir_micro(num_classes=10, backend=backend).eval()
    layers = [m for m in model.modules() if isinstance(m, rk.RSIRAttention)]
    sizes = [(32 + 4 * i, 32 + 4 * (i % 3)) for i in range(modules.FIXED_ORDER_CACHE_SIZE + 4)]
    images = {size: torch.randn(2, 3, *size) for size in sizes}
    with torch.no_grad():
        serial = {size: model(x) for size, x in images.items()}
    for layer in layers:  # the threads fill the caches themselves, evicting as they go
        layer._fixed_orders.clear()
    failures = []
    start = threading.Barrier(THREADS)

    def run(seed):
        order = sizes * 3
        random.Random(seed).shuffle(order)
        start.wait()
        try:
            with torch.no_grad():
                for size in order:
                    out = model(images[size])
                    if not torch.equal(out, serial[size]):
                        failures.append((seed, size, float((out - serial[size]).abs().max())))
        except Exception as e:  # reported below, not lost in the thread
            failures.append((seed, repr(e)))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    assert failures == []
    for layer in layers:
        assert 0 < len(layer._fixed_orders) <= modules.FIXED_ORDER_CACHE_SIZE
        for (seed, height, width, _), order in layer._fixed_orders.items():
            assert torch.equal(order, samplers.fixed_rs_index(height, width, layer.window_size, seed))
