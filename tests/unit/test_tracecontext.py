from pdmesh.rpc import tracecontext as tc


def test_child_keeps_trace_id_and_changes_span():
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    c = tc.child(tp)
    assert tc.valid(c) and tc.trace_id(c) == "4bf92f3577b34da6a3ce929d0e0e4736" and c != tp
    assert tc.metadata(tp) == (("traceparent", tp),)  # the caller's span is the parent downstream
    assert tc.valid(tc.metadata(None)[0][1])


def test_malformed_starts_a_new_trace():
    for bad in (None, "", "01-abc", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-XYZ92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
        assert not tc.valid(bad)
        assert tc.valid(tc.child(bad))
    assert tc.trace_id("junk") == "-"
