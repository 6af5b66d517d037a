"""The coordinator channel's HTTP/2 stream window, sized from the topology's links (geotrain.wire.channel)."""

from geotrain.config.derive import stream_window_bytes, worker_config
from geotrain.config.topology import parse_topology
from geotrain.wire.channel import MAX_WINDOW_BYTES, MIN_WINDOW_BYTES, grpc_options, window_for

MiB = 1 << 20


def test_the_window_is_twice_the_largest_bandwidth_delay_product_in_whole_mib():
    # 10 Gbit/s, 100 ms one way: RTT 0.2 s, BDP 250 MB; twice that is 500 MB = 476.8 MiB -> 477 MiB
    assert window_for([(10_000, 100, 0)]) == 477 * MiB
    # 1 Gbit/s, 50 ms + 5 ms jitter: RTT 0.11 s, BDP 13.75 MB -> 27.5 MB -> 27 MiB (26.2, rounded up)
    assert window_for([(1000, 50, 5), (100, 5, 0)]) == 27 * MiB


def test_short_links_and_no_links_take_the_floor_and_long_fat_ones_the_cap():
    assert window_for([]) == MIN_WINDOW_BYTES == 8 * MiB
    assert window_for([(1000, 5, 0)]) == MIN_WINDOW_BYTES  # the demo's: BDP 1.25 MB
    assert window_for([(100_000, 150, 0)]) == MAX_WINDOW_BYTES  # 100 Gbit/s across an ocean: BDP 3.75 GB


def test_a_topology_gives_both_ends_the_window_of_its_links_to_the_coordinator(tmp_path):
    t = parse_topology({"name": "w", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                        "coordinator": {"at": "a"},
                        "links": {"default": {"bandwidth": "10gbit", "latency": "40ms"},
                                  "pairs": [{"between": ["a", "b"], "bandwidth": "1gbit", "latency": "5ms"}]}},
                       source="t.yaml")
    # b reaches the coordinator (at a) over 1 Gbit/s x 5 ms: the floor; the 10 Gbit/s default joins nobody to it
    assert stream_window_bytes(t) == MIN_WINDOW_BYTES
    far = parse_topology({"name": "w", "sites": [{"name": "a", "workers": 1}, {"name": "b", "workers": 1}],
                          "links": {"default": {"bandwidth": "10gbit", "latency": "40ms"}}}, source="t.yaml")
    assert stream_window_bytes(far) == window_for([(10_000, 40, 0)]) == 191 * MiB
    assert worker_config(far, tmp_path).stream_window_bytes == 191 * MiB
    assert ("grpc.http2.lookahead_bytes", 191 * MiB) in grpc_options(191 * MiB)
