"""The benchmarks name their result files after the machine kind; one cloud CPU name ("AMD EPYC") has
been three different machines, so the microarchitecture is part of the name."""

import pytest

from ibkd.experiments._machine import cpu_family_model, cpu_microarchitecture


def cpuinfo(vendor: str, family: int, model: int) -> str:
    one = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: X\n\n"
    return one + one.replace("processor\t: 0", "processor\t: 1")


@pytest.mark.parametrize(
    "vendor, family, model, expected",
    [
        ("AuthenticAMD", 25, 17, "zen4"),  # EPYC Genoa: the AVX-512 + bf16 host of 2026-12-04
        ("AuthenticAMD", 25, 1, "zen3"),  # EPYC Milan: the AVX2-only host
        ("AuthenticAMD", 25, 0xA0, "zen4"),
        ("AuthenticAMD", 26, 2, "zen5"),
        ("AuthenticAMD", 23, 49, "zen2"),
        ("GenuineIntel", 6, 143, "family 6 model 143"),
    ],
)
def test_the_microarchitecture_comes_from_vendor_family_and_model(vendor, family, model, expected):
    assert cpu_family_model(cpuinfo(vendor, family, model)) == (vendor, family, model)
    assert cpu_microarchitecture(cpuinfo(vendor, family, model)) == expected


def test_a_cpuinfo_without_family_gives_none():
    assert cpu_microarchitecture("processor\t: 0\nmodel name\t: some ARM core\n") is None
