"""CSV rows of orders: validating what comes in, and making what goes out safe to open."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation

HEADER = ["order_id", "customer_email", "amount", "currency", "ordered_at"]
# Active ISO 4217 codes.
_ISO_4217 = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL
BSD BTN BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP
ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR
IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL
LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR
NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD
SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL
"""
CURRENCIES = frozenset(_ISO_4217.split())
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
_CENTS = Decimal("0.01")
MAX_AMOUNT = Decimal("999999999999.99")


class RowError(ValueError):
    """Raised with the reason a CSV row is rejected."""


@dataclass(frozen=True)
class OrderRow:
    """A validated order row."""

    order_id: str
    customer_email: str
    amount: Decimal
    currency: str
    ordered_at: datetime


def parse_row(fields: list[str]) -> OrderRow:
    """Validate one data row, or raise `RowError` saying what is wrong."""
    if len(fields) != len(HEADER):
        raise RowError(f"expected {len(HEADER)} fields, found {len(fields)}")
    order_id, email, amount_text, currency, ordered_text = (f.strip() for f in fields)
    if not 1 <= len(order_id) <= 64:
        raise RowError("order_id must be 1 to 64 characters")
    if len(email) > 320 or not _EMAIL.match(email):
        raise RowError(f"customer_email {email[:50]!r} is not an email address")
    try:
        amount = Decimal(amount_text)
    except InvalidOperation:
        raise RowError(f"amount {amount_text[:30]!r} is not a decimal number") from None
    if not amount.is_finite() or amount.quantize(_CENTS) != amount or abs(amount) > MAX_AMOUNT:
        raise RowError(f"amount {amount_text[:30]!r} must have at most 2 decimal places")
    if currency not in CURRENCIES:
        raise RowError(f"currency {currency[:10]!r} is not an ISO 4217 code")
    try:
        ordered_at = datetime.fromisoformat(ordered_text)
    except ValueError:
        raise RowError(f"ordered_at {ordered_text[:40]!r} is not an ISO 8601 timestamp") from None
    if ordered_at.tzinfo is None:
        raise RowError("ordered_at must carry a time zone")
    return OrderRow(order_id, email.lower(), amount.quantize(_CENTS), currency, ordered_at)


# First characters that may make a spreadsheet read a cell as a formula: OWASP's list (= + -
# @, tab, carriage return, line feed), their full-width forms U+FF1D, U+FF0B, U+FF0D, U+FF20
# (spreadsheets in East Asian locales may read them as the ASCII ones), and, erring on the
# side of caution, | (DDE's separator, as in cmd|'/c calc'!A0).
FORMULA_STARTS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20|")


def safe_cell(value: str) -> str:
    """Defuse spreadsheet formula injection: a text cell may not start a formula."""
    if value and value[0] in FORMULA_STARTS:
        return "'" + value
    return value
