// The environment variables the C++ side reads, parsed one way (distilkernels/_env.py parses the Python side's
// with the same spellings):
// - a switch is on for "1", "on", "true", "yes" and off for "0", "off", "false", "no", in any case;
// - a choice is one of a fixed list of names, in any case;
// - unset or empty keeps the default. Any other value warns once, naming the variable and what it takes, and keeps
//   the default: a misspelt setting is never silently taken for some other one.
#pragma once

#include <c10/util/Exception.h>

#include <cctype>
#include <cstdlib>
#include <initializer_list>
#include <mutex>
#include <set>
#include <string>

namespace distilkernels {
namespace env {

inline std::string lower(const char* text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Records name=value as warned about; false if it already was. distilkernels/_env.py marks what it reported at
// import (a Python warning, which this one, printed by c10 on stderr, is not), so that it is not said twice.
inline bool first_report(const std::string& name, const std::string& value) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  return seen.insert(name + "=" + value).second;
}

// Warns about name=value once per process (a switch read on every call must not warn on every call).
inline void warn_once(const char* name, const char* value, const std::string& expected, const std::string& kept) {
  if (first_report(name, value)) TORCH_WARN(name, " must be ", expected, ", got '", value, "'; using ", kept);
}

// The switch `name`: `fallback` when unset, empty or misspelt (the last with a warning).
inline bool switch_on(const char* name, bool fallback) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  const std::string value = lower(raw);
  if (value == "1" || value == "on" || value == "true" || value == "yes") return true;
  if (value == "0" || value == "off" || value == "false" || value == "no") return false;
  warn_once(name, raw, "one of 1/on/true/yes or 0/off/false/no", fallback ? "on" : "off");
  return fallback;
}

// The choice `name`, lower-cased: one of `allowed`, or "" when unset, empty or not one of them (with a warning).
inline std::string choice(const char* name, std::initializer_list<const char*> allowed) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return "";
  const std::string value = lower(raw);
  std::string names;
  for (const char* option : allowed) {
    if (value == option) return value;
    names += names.empty() ? option : std::string("|") + option;
  }
  warn_once(name, raw, "one of " + names, "the default");
  return "";
}

}  // namespace env
}  // namespace distilkernels
